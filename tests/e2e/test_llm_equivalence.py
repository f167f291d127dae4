"""FASTKV with compression off is a correct attention backend: same greedy tokens
as vLLM's default backend, over mixed-length batches that exercise chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from tests.e2e.engines import generate

#: Small enough that the longer prompts arrive in several chunked-prefill chunks.
CHUNK = 64
ENGINE = dict(
    max_model_len=1024,
    max_num_batched_tokens=CHUNK,
    enable_chunked_prefill=True,
    # fp32 on CPUs; FlashAttention (vLLM's default on GPUs, and FASTKV's base there)
    # runs half precision only.
    dtype="bfloat16" if torch.cuda.is_available() else "float32",
    seed=0,
)


def _prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids below 6 are the tokenizer's special tokens; keep prompts to ordinary text.
    return [[rng.randrange(6, vocab_size) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize(
    ("model_fixture", "fastkv_settings", "compile_model"),
    [
        ("tiny_llama", {"enabled": False}, True),
        ("tiny_qwen2", {"tsp_rate": 1.0, "retain_rate": 1.0}, False),
    ],
    ids=["llama-disabled-compiled", "qwen2-rates-1.0-eager"],
)
def test_fastkv_matches_default_backend(request, model_fixture, fastkv_settings, compile_model):
    model = request.getfixturevalue(model_fixture)
    lengths = [3, 17, CHUNK, CHUNK + 1, 150, 333]
    prompts = _prompts(1024, lengths)
    engine = dict(ENGINE, enforce_eager=not compile_model)

    stock = generate(model, prompts, max_tokens=24, **engine)
    fastkv = generate(
        model,
        prompts,
        max_tokens=24,
        attention_backend="FASTKV",
        additional_config={"fastkv": fastkv_settings},
        **engine,
    )

    # The stock engine runs whatever vLLM picks here (CPU_ATTN on CPUs).
    assert len(stock["backends"]) == 1 and stock["backends"] != ["FASTKV"]
    assert fastkv["backends"] == ["FASTKV"]
    assert [len(t) for t in fastkv["tokens"]] == [24] * len(prompts)
    assert fastkv["tokens"] == stock["tokens"]
    if engine["dtype"] == "float32":
        # The torch oracle (full-KV policy) on the same checkpoint agrees with the engine,
        # which ties the reference that later checks retention to what vLLM computes.
        assert fastkv["tokens"] == _reference_tokens(model, prompts, max_tokens=24)


def _reference_tokens(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from vllm_fastkv.reference import generate

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [generate(hf_model, ids, max_tokens, policy="full").tolist() for ids in prompts]
