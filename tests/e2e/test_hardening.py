"""Hardening of `vllm serve MODEL --attention-backend FASTKV`: bad input, bursts, disconnects.

One server for the module (tiny random Llama, CPU). Traffic goes to 127.0.0.1 only; every
loop is bounded in count and in time. The tests run in file order; the last one checks that
all the KV cache blocks of everything before went back to the pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest

from tests.e2e.engines import running_server

MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("hardening-server") / "server.log"
    serve_args = (
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--served-model-name", "tiny",
        "--max-num-seqs", str(MAX_NUM_SEQS),
    )  # fmt: skip
    # As the Docker entrypoint runs it: FastKV's engine-side metrics reach /metrics.
    metrics_dir = tmp_path_factory.mktemp("prometheus-multiproc")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with running_server(tiny_llama, log_path, *serve_args, env=env) as base:
        yield base


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


# --- helpers ---------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            label_text, _, value = rest[1:].partition("} ")
        elif rest.startswith(" "):
            label_text, value = "", rest
        else:  # another metric whose name starts with ``name``
            continue
        pairs = dict(
            item.split("=", 1) for item in label_text.split(",") if "=" in item
        )  # label values here hold no commas
        if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value.split()[0])
            found = True
    assert found, f"metric {name} {labels or ''} not on /metrics"
    return total


def metrics(http: httpx.Client) -> str:
    response = http.get("/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls ``condition`` (at most ``timeout`` seconds); returns the seconds it took."""
    start = time.monotonic()
    for _ in range(int(timeout / 0.25) + 1):
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s")


def complete(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "tiny", **body})


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"], error["message"][:500]


def assert_serving(http: httpx.Client) -> None:
    assert http.get("/health", timeout=10).status_code == 200
    out = complete(http, prompt="Hello there", max_tokens=4, temperature=0, ignore_eos=True)
    assert out.status_code == 200, out.text[:500]
    assert out.json()["usage"]["completion_tokens"] == 4


# --- 1. absurd input -------------------------------------------------------------------------


def test_text_prompt_longer_than_context_is_400(http: httpx.Client):
    response = complete(http, prompt="word " * 5000, max_tokens=4)
    assert_error(response, 400, f"maximum context length is {MAX_MODEL_LEN} tokens")
    assert_serving(http)


def test_token_prompt_longer_than_context_is_400(http: httpx.Client):
    response = complete(http, prompt=[7] * 2000, max_tokens=4)
    assert_error(response, 400, f"maximum context length is {MAX_MODEL_LEN}", "2000 input tokens")
    # Fits alone, not with the requested output: rejected too, not truncated.
    response = complete(http, prompt=[7] * (MAX_MODEL_LEN - 4), max_tokens=10)
    assert_error(response, 400, f"maximum context length is {MAX_MODEL_LEN}")
    assert_serving(http)


@pytest.mark.parametrize(
    ("max_tokens", "fragment"),
    [
        (-1, "max_tokens must be at least 1"),
        (0, "max_tokens must be at least 1"),
        (10**9, f"cannot be greater than max_model_len=max_total_tokens={MAX_MODEL_LEN}"),
    ],
    ids=["negative", "zero", "huge"],
)
def test_bad_max_tokens_is_400(http: httpx.Client, max_tokens: int, fragment: str):
    assert_error(complete(http, prompt="hi", max_tokens=max_tokens), 400, fragment)
    assert_serving(http)


def test_empty_prompt_is_400(http: httpx.Client):
    # vLLM 0.26 rejects an empty prompt (it does not generate from BOS alone).
    assert_error(complete(http, prompt="", max_tokens=4), 400, "non-empty")
    assert_error(complete(http, prompt=[], max_tokens=4), 400, "at least one prompt")
    assert_serving(http)


def test_malformed_json_is_400(http: httpx.Client):
    response = http.post(
        "/v1/completions",
        content=b'{"model": "tiny", "prompt": "hi",',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 400, "JSON decode error")
    assert_serving(http)


def test_unknown_model_is_404(http: httpx.Client):
    response = http.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert_error(response, 404, "`nope` does not exist")
    assert_serving(http)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ({"retain_rate": 1.5}, ("fastkv.retain_rate=1.5",)),
        ({"retain_rate": "lots"}, ("fastkv.retain_rate='lots'", "valid number")),
        ({"bogus": 1}, ("fastkv.bogus", "unknown setting")),
        ({"window": 4}, ("fastkv.window", "per deployment")),
        ("fast", ("must be a JSON object",)),
        ([0.2], ("must be a JSON object",)),
    ],
    ids=["out-of-range", "wrong-type", "unknown-key", "deployment-only", "string", "list"],
)
def test_malformed_fastkv_override_is_400(http: httpx.Client, override, fragments):
    response = complete(http, prompt="hi", max_tokens=4, fastkv=override)
    assert_error(response, 400, "Invalid FastKV setting", *fragments)
    chat = http.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
              "fastkv": override},
    )  # fmt: skip
    assert_error(chat, 400, "Invalid FastKV setting", *fragments)
    assert_serving(http)


def test_retention_metrics(http: httpx.Client):
    """Compressing a 600-token prompt shows on /metrics (server defaults: retain 0.1)."""
    before = metrics(http)
    prompts = metric(before, "vllm:fastkv_compressed_prompts_total")
    tokens = metric(before, "vllm:fastkv_prompt_tokens_total")
    kept = metric(before, "vllm:fastkv_retained_tokens_total")
    freed = metric(before, "vllm:fastkv_freed_blocks_total")
    steps = metric(before, "vllm:fastkv_compression_seconds_count")
    seconds = metric(before, "vllm:fastkv_compression_seconds_sum")
    body = dict(prompt=[11] * 600, max_tokens=2, ignore_eos=True, temperature=0)
    assert complete(http, **body).status_code == 200
    after = metrics(http)
    # 600 tokens keep B' = 600 - S entries, S a whole number of blocks.
    assert metric(after, "vllm:fastkv_compressed_prompts_total") == prompts + 1
    assert metric(after, "vllm:fastkv_prompt_tokens_total") == tokens + 600
    new_kept = metric(after, "vllm:fastkv_retained_tokens_total") - kept
    new_freed = metric(after, "vllm:fastkv_freed_blocks_total") - freed
    assert 60 <= new_kept < 600 and new_freed >= 1
    assert (600 - new_kept) % new_freed == 0  # whole blocks: S = freed x block size
    # One engine step compressed it (all 4 layers), timed by the worker.
    assert metric(after, "vllm:fastkv_compression_seconds_count") == steps + 1
    assert metric(after, "vllm:fastkv_compression_seconds_sum") > seconds
    # vLLM's own metrics are still there in multiprocess mode.
    assert metric(after, "vllm:request_success_total") > 0


@pytest.mark.parametrize(
    "override", [{"retain_rate": 0.5}, {"enabled": False}, {"mode": "constant",
                                                            "max_capacity_prompt": 64}],
    ids=["rate", "disabled", "constant"],
)
def test_fastkv_override_is_served(http: httpx.Client, override):
    # 600 tokens: compressed under the server's default settings and the overrides.
    body = dict(prompt=[11] * 600, max_tokens=8, ignore_eos=True, temperature=0)
    response = complete(http, fastkv=override, **body)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["completion_tokens"] == 8


# --- 2. concurrent burst ---------------------------------------------------------------------


def test_concurrent_burst(server: str, http: httpx.Client):
    n, max_tokens = 32, 16
    prompts = [f"Request number {i} asks about the river market" for i in range(n)]

    def one(prompt: str) -> httpx.Response:
        with httpx.Client(base_url=server, timeout=120) as client:
            return complete(client, prompt=prompt, max_tokens=max_tokens, ignore_eos=True)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        done, not_done = wait(futures, timeout=150)
    assert not not_done, f"{len(not_done)} of {n} requests unanswered after 150s"
    elapsed = time.monotonic() - start
    for future in futures:
        response = future.result()
        assert response.status_code == 200, response.text[:500]
        body = response.json()
        assert body["usage"]["completion_tokens"] == max_tokens
        assert body["choices"][0]["finish_reason"] == "length"
    assert elapsed < 150
    assert_serving(http)


# --- 3. client disconnect mid-stream ---------------------------------------------------------


def test_client_disconnect_mid_stream_aborts_request(server: str, http: httpx.Client):
    def finished_by_length() -> float:
        return metric(metrics(http), "vllm:request_success_total", finished_reason="length")

    wait_until(lambda: metric(metrics(http), "vllm:num_requests_running") == 0, 30, "busy")
    length_before = finished_by_length()
    body = {
        "model": "tiny", "prompt": "hi", "max_tokens": MAX_MODEL_LEN - 24, "ignore_eos": True,
        "stream": True,
    }  # fmt: skip
    with httpx.Client(base_url=server, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            chunks = 0
            for line in lines:  # bounded: stops after 5 chunks or at the stream's end
                chunks += line.startswith("data: {")
                if chunks >= 5:
                    break
            assert chunks == 5
            # The request is generating while the connection is open.
            assert metric(metrics(http), "vllm:num_requests_running") == 1
        # Leaving both blocks closes the connection with ~1000 tokens still to come.
    wait_until(
        lambda: metric(metrics(http), "vllm:num_requests_running") == 0,
        30,
        "request still running after the client disconnected",
    )
    # Aborted, not run to its end: it never finished by length.
    assert finished_by_length() == length_before
    assert_serving(http)
    assert finished_by_length() == length_before + 1  # the check request, counted as usual


# --- 4. no KV block leak ---------------------------------------------------------------------


def test_kv_cache_returns_to_zero(server: str, http: httpx.Client):
    # The gauge measures something: a request in flight holds blocks.
    body = {"model": "tiny", "prompt": [11] * 600, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(base_url=server, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            chunks = 0
            for line in lines:
                chunks += line.startswith("data: {")
                if chunks >= 3:
                    break
            assert metric(metrics(http), "vllm:kv_cache_usage_perc") > 0
    # After everything in this module (rejected, burst, aborted, completed requests), every
    # block is back in the pool and nothing is running or waiting.

    def idle() -> bool:
        text = metrics(http)
        return (
            metric(text, "vllm:kv_cache_usage_perc") == 0
            and metric(text, "vllm:num_requests_running") == 0
            and metric(text, "vllm:num_requests_waiting") == 0
        )

    wait_until(idle, 30, "KV cache usage did not return to 0")
