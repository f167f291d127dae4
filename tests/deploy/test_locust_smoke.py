"""The locust scenarios against a real `vllm serve --attention-backend FASTKV` (tiny model, CPU).

Runs loadtests/locustfile.py headless for a bounded time with one user per user class, on
loopback only, and fails on any failed request, any exception in a user, or a scenario that
sent nothing. Prompt sizes are scaled down to the tiny model's 2048-token context (its
tokenizer makes about 1.6 characters per token of news text).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import REPO_ROOT
from tests.e2e.engines import running_server

LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"
RUN_TIME_S = 30
USER_CLASSES = ("ShortChatUser", "RagUser", "StreamingUser", "MixedUser")
EXPECTED_ROWS = {
    ("POST", "chat:short"), ("POST", "chat:rag"), ("TTFT", "chat:rag"),
    ("POST", "completion:stream"), ("TTFT", "completion:stream"), ("GET", "models"),
}
SMOKE_ENV = {
    "LOADTEST_MAX_TOKENS": "16",
    # The tiny model's byte-level tokenizer can take ~1 token a character: 2,000 document
    # characters plus template and question once came to 2,033 prompt tokens, which with
    # 16 output tokens overflows the server's 2,048 (a 400, counted as a failure).
    "LOADTEST_RAG_PROMPT_CHARS": "1500",
    "LOADTEST_STREAM_PROMPT_CHARS": "800",
    "LOADTEST_WAIT_MIN": "0.1",
    "LOADTEST_WAIT_MAX": "0.5",
}


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` on 127.0.0.1 with the FASTKV backend; yields its base URL once healthy."""
    log_path = tmp_path_factory.mktemp("locust-server") / "server.log"
    serve_args = ("--max-model-len", "2048", "--enforce-eager", "--served-model-name", "tiny")
    with running_server(tiny_llama, log_path, *serve_args) as base:
        yield base


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_locust_scenarios_run_clean(server: str, tmp_path: Path):
    prefix = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", server, "-u", str(len(USER_CLASSES)), "-r", str(len(USER_CLASSES)),
            "-t", f"{RUN_TIME_S}s", "--stop-timeout", "60", "--exit-code-on-error", "1",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", *USER_CLASSES,
        ],
        check=False, capture_output=True, text=True, env={**env, **SMOKE_ENV}, cwd=tmp_path,
        timeout=RUN_TIME_S + 180,
    )
    report = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    stats = {(r["Type"], r["Name"]): r for r in _csv_rows(Path(f"{prefix}_stats.csv"))}
    assert EXPECTED_ROWS <= set(stats), f"scenarios missing from {sorted(stats)}\n{report}"
    for key in EXPECTED_ROWS:
        assert int(stats[key]["Request Count"]) > 0, f"{key} sent nothing\n{report}"
    assert int(stats[("", "Aggregated")]["Failure Count"]) == 0, (
        f"failures: {_csv_rows(Path(f'{prefix}_failures.csv'))}\n{report}"
    )
    assert _csv_rows(Path(f"{prefix}_exceptions.csv")) == [], report
    assert proc.returncode == 0, report
