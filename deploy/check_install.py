"""Build-time check that the image can run the plugin (run by the Dockerfile).

The Dockerfile installs vllm-fastkv with ``--no-deps`` so pip never replaces the CUDA build
of vLLM and torch that the base image ships. That leaves nothing to notice a base image whose
vLLM or pydantic no longer meets our pins; this script does, and it checks that vLLM will find
the plugin through its entry point, so a broken image fails ``docker build``, not a pod start.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement

DISTRIBUTION = "vllm-fastkv"
PLUGIN_GROUP = "vllm.general_plugins"


def problems() -> list[str]:
    """Unmet install requirements of vllm-fastkv and a missing plugin entry point, if any."""
    found = []
    for line in md.requires(DISTRIBUTION) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (e.g. [test]); not needed at run time
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            found.append(f"{req} is required but {req.name} is not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req} is required but {req.name}=={installed} is installed")
    if not md.entry_points(group=PLUGIN_GROUP, name="fastkv"):
        found.append(f"no 'fastkv' entry point in {PLUGIN_GROUP}: vLLM would not load the plugin")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"check_install: {problem}", file=sys.stderr)
    if not found:
        print(f"check_install: {DISTRIBUTION} {md.version(DISTRIBUTION)} ready")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
