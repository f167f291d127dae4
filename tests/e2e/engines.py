"""Helpers to run vLLM engines and servers as subprocesses from tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

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
    model: Path,
    prompts: list[list[int]],
    max_tokens: int,
    timeout: float = 600,
    extra_args: list[dict | None] | None = None,
    **engine,
) -> dict:
    """Greedy-generate in a fresh process; returns {"tokens": [...], "backends": [...]}
    and, the engine core running in that process, "scheduler" (block pool, FastKV totals).
    ``extra_args`` are per-prompt ``SamplingParams.extra_args``."""
    spec = {
        "model": str(model), "engine": engine, "prompts": prompts, "max_tokens": max_tokens,
        "extra_args": extra_args,
    }  # fmt: skip
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


#: What vLLM logs when the FASTKV backend is selected (CPU: ours; CUDA: vLLM's selector).
FASTKV_SELECTED = re.compile(r"Using (AttentionBackendEnum\.)?FASTKV .*backend")


@contextmanager
def running_server(
    model: Path,
    log_path: Path,
    *serve_args: str,
    startup_timeout: float = 300,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`vllm serve MODEL --attention-backend FASTKV` on 127.0.0.1, as users start it.

    Yields the base URL once /health answers and the log shows FASTKV was selected;
    stops the server afterwards. The server's output goes to ``log_path``.
    """
    port = free_port()
    cmd = [
        *vllm_command(), "serve", str(model), "--attention-backend", "FASTKV",
        "--host", "127.0.0.1", "--port", str(port), *serve_args,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=engine_env(**(env or {}))
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while not _healthy(base):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"server not healthy in {startup_timeout}s:\n{log_path.read_text()[-5000:]}"
                    )
                time.sleep(1)
            assert FASTKV_SELECTED.search(log_path.read_text()), "FASTKV was not selected"
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
