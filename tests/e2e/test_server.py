"""`vllm serve MODEL --attention-backend FASTKV`: the OpenAI server, as users run it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openai import OpenAI

from tests.e2e.engines import engine_env, free_port, running_server, vllm_command


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    serve_args = ("--max-model-len", "1024", "--enforce-eager", "--served-model-name", "tiny")
    with running_server(tiny_llama, log_path, *serve_args) as base:
        yield base


@pytest.fixture
def client(server: str) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_and_models(server: str, client: OpenAI):
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion(client: OpenAI):
    out = client.completions.create(
        model="tiny", prompt="The river market " * 40, max_tokens=16, temperature=0
    )
    assert out.usage.completion_tokens == 16
    assert out.usage.prompt_tokens > 100
    assert out.choices[0].text


def test_completion_streaming_matches_non_streaming(client: OpenAI):
    prompt = "alpha beta gamma delta " * 10
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    chunks = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text


def test_chat_completion_and_stream(client: OpenAI):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Remember the passkey 71234. What is the passkey?"},
    ]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert streamed == out.choices[0].message.content


@pytest.mark.parametrize(
    ("extra_args", "env", "field"),
    [
        (["--additional-config", '{"fastkv": {"tsp_rate": 1.5}}'], {}, "fastkv.tsp_rate"),
        (["--additional-config", '{"fastkv": {"retain_rate": 0}}'], {}, "fastkv.retain_rate"),
        (["--additional-config", '{"fastkv": {"tsp_layer": 99}}'], {}, "fastkv.tsp_layer"),
        (["--additional-config", '{"fastkv": {"tsp_ratio": 0.2}}'], {}, "fastkv.tsp_ratio"),
        ([], {"VLLM_FASTKV_POOLING": "median"}, "fastkv.pooling"),
        ([], {"VLLM_FASTKV_WINDOWS": "8"}, "VLLM_FASTKV_WINDOWS"),
        (["--additional-config", '{"fastkv": {"kv_bits": 2, "retain_rate": 1.0}}'], {},
         "fastkv.kv_bits"),
    ],
    ids=[
        "rate-above-1",
        "rate-zero",
        "layer-beyond-model",
        "unknown-key",
        "bad-env",
        "unknown-env",
        "low-bit-without-retention",
    ],
)
def test_bad_config_stops_startup(tiny_llama: Path, extra_args, env, field):
    cmd = [
        *vllm_command(),
        "serve",
        str(tiny_llama),
        "--attention-backend",
        "FASTKV",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        *extra_args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=engine_env(**env))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert field in output
    assert "Invalid FastKV setting" in output
    assert "Traceback" not in output
