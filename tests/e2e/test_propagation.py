"""Token-selective propagation inside vLLM: the same tokens as the torch reference.

With TSP on, layers after ``tsp_layer`` run over the selected tokens only and keep their
retained entries among them; a different selection at ``tsp_layer`` (or a propagated
token at a wrong position or slot) changes every later layer's cache and the
continuation, so agreement with :func:`vllm_fastkv.reference.fastkv_prefill` shows that
vLLM propagated the reference's tokens and retained the reference's entries. Prompts
arrive unchunked and in chunks of several sizes (the earlier chunks' hidden states wait
in the propagation buffer), next to decodes and other prompts' chunks in the same steps.
"""

from __future__ import annotations

import pytest

from tests.e2e.engines import generate
from tests.e2e.reference_check import (
    ENGINE,
    MAX_TOKENS,
    ON_GPU,
    RETENTION,
    assert_matches_reference,
    load,
    prefill,
    random_prompts,
)
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.reference import greedy_decode
from vllm_fastkv.retention import plan_propagation, plan_retention

#: Propagate 40% past layer 1 of the tiny models' 4, keep 25% per layer.
TSP = {"retain_rate": 0.25, "tsp_rate": 0.4, "tsp_layer": 1}
LENGTHS = [20, 131, 150, 300, 333, 517]


def _propagated(settings: dict, lengths: list[int]) -> int:
    config = FastKVConfig.validated(settings)
    return sum(
        plan_propagation(config, plan_retention(config, n, ENGINE["block_size"]),
                         ENGINE["block_size"]) is not None
        for n in lengths
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model_fixture", "chunk"),
    [("tiny_llama", 1024), ("tiny_llama", 64), ("tiny_llama", 100), ("tiny_qwen2", 48)],
    ids=["llama-unchunked", "llama-chunk64", "llama-chunk100", "qwen2-chunk48"],
)
def test_propagation_matches_reference(request, model_fixture, chunk):
    model = request.getfixturevalue(model_fixture)
    prompts = random_prompts(LENGTHS, seed=3)
    settings = {**TSP, "tsp_buffer_tokens": 4096}
    result = generate(
        model, prompts, MAX_TOKENS, max_num_batched_tokens=chunk,
        additional_config={"fastkv": settings}, **ENGINE,
    )  # fmt: skip
    assert_matches_reference(model, prompts, [settings] * len(prompts), result["tokens"])
    sched = result["scheduler"]
    assert sched["propagated_prompts"] == _propagated(settings, LENGTHS) == 5
    assert sched["buffer_tokens_in_use"] == 0
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def test_rate_one_equals_retention(tiny_llama):
    """tsp_rate 1.0 is retention alone: nothing propagates, and the tokens are those of a
    retention-only engine (identical on any device) and of the reference (CPU)."""
    prompts = random_prompts([150, 200, 260, 333, 410], seed=4)
    runs = [
        generate(
            tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
            additional_config={"fastkv": settings}, **ENGINE,
        )  # fmt: skip
        for settings in ({**TSP, "tsp_rate": 1.0}, RETENTION)
    ]
    assert runs[0]["scheduler"]["propagated_prompts"] == 0
    assert runs[0]["tokens"] == runs[1]["tokens"]
    if not ON_GPU:
        assert_matches_reference(tiny_llama, prompts, [RETENTION] * 5, runs[0]["tokens"])


def test_full_buffer_falls_back_to_retention(tiny_llama):
    """Chunked prompts that find no room in the buffer keep retention only, exactly."""
    prompts = random_prompts([150, 200, 260, 333, 410], seed=5)
    settings = {**TSP, "tsp_buffer_tokens": 0}
    result = generate(
        tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
        additional_config={"fastkv": settings}, **ENGINE,
    )  # fmt: skip
    assert result["scheduler"]["propagated_prompts"] == 0
    retention = {**TSP, "tsp_rate": 1.0}
    assert_matches_reference(tiny_llama, prompts, [retention] * 5, result["tokens"])


def test_propagation_changes_the_output(tiny_llama):
    """Guard for the checks above: the reference's tokens with TSP differ from retention's
    on these prompts, so matching them needs the propagated selection."""
    model = load(tiny_llama)
    prompts = random_prompts(LENGTHS, seed=3)[1:]
    retention = {**TSP, "tsp_rate": 1.0}
    with_tsp = [greedy_decode(model, prefill(model, ids, TSP), MAX_TOKENS).tolist()
                for ids in prompts]  # fmt: skip
    without = [greedy_decode(model, prefill(model, ids, retention), MAX_TOKENS).tolist()
               for ids in prompts]  # fmt: skip
    assert sum(a != b for a, b in zip(with_tsp, without)) >= 4
