"""KV retention inside vLLM: the compressed cache decodes exactly like the torch reference.

See :mod:`tests.e2e.reference_check` for how agreement with the torch reference is judged
on CPUs (identical tokens) and GPUs (teacher forcing).
"""

from __future__ import annotations

import pytest

from tests.e2e.engines import generate
from tests.e2e.reference_check import (
    BLOCK,
    ENGINE,
    GPU_MEAN_GAP,
    MAX_TOKENS,
    RETENTION,
    assert_matches_reference,
    kept_entries,
    load,
    logit_gaps,
    prefill,
    random_prompts,
    run_under_a_small_pool,
)
from vllm_fastkv.reference import greedy_decode

RECENCY = {**RETENTION, "selection": "recency"}


@pytest.mark.parametrize(
    ("model_fixture", "chunk", "settings"),
    [
        ("tiny_llama", 64, RETENTION),
        ("tiny_llama", 1024, RETENTION),
        ("tiny_qwen2", 48, RETENTION),
        ("tiny_llama", 64, RECENCY),
    ],
    ids=["llama-chunk64", "llama-unchunked", "qwen2-chunk48", "llama-recency"],
)
def test_retention_matches_reference(request, model_fixture, chunk, settings):
    model = request.getfixturevalue(model_fixture)
    # Short prompts stay whole; 131 = 2 x 64 + 3 would end in a 3-token chunk at chunk 64,
    # which the scheduler lengthens to the 8-token window.
    lengths = [20, 131, 150, 300, 333, 517]
    prompts = random_prompts(lengths)
    result = generate(
        model, prompts, MAX_TOKENS, max_num_batched_tokens=chunk,
        additional_config={"fastkv": settings}, **ENGINE,
    )  # fmt: skip
    assert result["backends"] == ["FASTKV"]
    assert_matches_reference(model, prompts, [settings] * len(prompts), result["tokens"])

    sched = result["scheduler"]
    # vLLM's scheduler plus retention; compaction rewrites prompt blocks, so no prefix cache.
    assert sched["scheduler_cls"] in ("FastKVScheduler", "FastKVAsyncScheduler")
    assert sched["prefix_caching"] is False
    starts = [n - kept_entries(settings, n) for n in lengths]
    assert sched["compressed_prompts"] == sum(s > 0 for s in starts) == 5
    assert sched["kept_tokens"] == sum(n - s for n, s in zip(lengths, starts) if s > 0)
    # Exactly the leading blocks before each start went back to the pool ...
    assert sched["freed_blocks"] == sum(s // BLOCK for s in starts)
    # ... and nothing leaked or was freed twice once all requests finished.
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def test_compression_changes_the_output(tiny_llama):
    """Guard for the checks above: at these settings a cache that was not compressed
    (or compressed wrongly) fails them by a wide margin."""
    model = load(tiny_llama)
    prompts = random_prompts([150, 300])
    full = [greedy_decode(model, prefill(model, ids, {"enabled": False}), MAX_TOKENS).tolist()
            for ids in prompts]  # fmt: skip
    kept = [greedy_decode(model, prefill(model, ids, RETENTION), MAX_TOKENS).tolist()
            for ids in prompts]  # fmt: skip
    assert full != kept
    gaps = logit_gaps(model, prompts, [RETENTION] * 2, full)
    assert min(g.mean().item() for g in gaps) > 2 * GPU_MEAN_GAP, gaps


def test_per_request_overrides(tiny_llama):
    """``extra_args["fastkv"]`` changes one request's budget or turns retention off."""
    prompts = random_prompts([300, 300, 300], seed=1)
    overrides = [None, {"fastkv": {"retain_rate": 0.5}}, {"fastkv": {"enabled": False}}]
    result = generate(
        tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
        additional_config={"fastkv": RETENTION}, extra_args=overrides, **ENGINE,
    )  # fmt: skip
    settings = [RETENTION, {**RETENTION, "retain_rate": 0.5}, {"enabled": False}]
    assert_matches_reference(tiny_llama, prompts, settings, result["tokens"])
    assert result["scheduler"]["compressed_prompts"] == 2


def test_preemption_under_a_small_pool(tiny_llama):
    """More long requests than the pool holds: preempted compressed requests are
    recomputed, every request finishes, and every block comes back."""
    run_under_a_small_pool(tiny_llama, RETENTION, 48)
