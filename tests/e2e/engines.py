"""Helpers to run vLLM engines and servers as subprocesses from tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.generate_worker import RESULT_PREFIX

WORKER = Path(__file__).with_name("generate_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def engine_env(**overrides: str) -> dict[str, str]:
    """Environment for a vLLM subprocess: ours, minus settings meant for this process only.

    TRITON_INTERPRET=1 (set for the kernel tests on CPU machines) would make vLLM see a
    working Triton in its engine processes and take GPU-only code paths.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(overrides)
    return env


def generate(
    model: Path, prompts: list[list[int]], max_tokens: int, timeout: float = 600, **engine
) -> dict:
    """Greedy-generate in a fresh process; returns {"tokens": [...], "backends": [...]}."""
    spec = {"model": str(model), "engine": engine, "prompts": prompts, "max_tokens": max_tokens}
    env = engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise AssertionError(
        f"engine failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` command of the interpreter running the tests.

    Its console script when installed next to the interpreter (what users type);
    otherwise the same entry point as a module (installs made with `pip --target`).
    """
    script = Path(sys.executable).with_name("vllm")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
