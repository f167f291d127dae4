"""Low-bit KV inside vLLM: packed retained KV decodes exactly like the torch reference.

The reference stores the same entries at the same bits at the same moments
(:class:`vllm_fastkv.reference.LowBitStore`: the pages a prompt fills at compression, then
one more whenever decoding grows the cache by a page), so on CPUs (fp32 engine) the
greedy tokens must be identical; the scheduler must free, besides the blocks before each
prompt's start, all but the first block of every packed page, and get all of them back.
See :mod:`tests.e2e.reference_check` for the GPU criterion (teacher forcing).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from tests.e2e.engines import generate
from tests.e2e.reference_check import (
    BLOCK,
    ENGINE,
    MAX_TOKENS,
    assert_gaps_agree,
    assert_matches_reference,
    load,
    logit_gaps,
    packed_layout,
    random_prompts,
    reference_tokens,
    run_under_a_small_pool,
)
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.retention import plan_retention

# Short prompts stay whole (20), keep too little to pack (300 at 2 bits), or pack 1-3
# pages; a small residual so that the tiny model's short prompts pack at all.
LENGTHS = [20, 300, 517, 640, 900]
LOW_BIT = {"retain_rate": 0.5, "tsp_rate": 1.0, "kv_residual": 16}
#: Packed pages after tsp_layer too (on the tiny Qwen2's 4 layers).
WITH_PROPAGATION = {"retain_rate": 0.4, "tsp_rate": 0.6, "tsp_layer": 1, "kv_bits": 4,
                    "kv_residual": 16, "tsp_buffer_tokens": 4096}  # fmt: skip


def _check_blocks(model_dir, settings: dict, sched: dict, decode_pages: bool) -> None:
    """The scheduler packed at least the pages the prompts fill at compression (more when
    decoding grows them, ``decode_pages``), freed exactly the blocks before each start plus
    ``R - 1`` per page, and got every block back."""
    layout = packed_layout(AutoConfig.from_pretrained(model_dir), settings)
    config = FastKVConfig.validated(settings)
    plans = [plan_retention(config, n, BLOCK, layout.page_tokens) for n in LENGTHS]
    prompt_pages = sum(p.packed_pages for p in plans if p)
    assert prompt_pages >= 3, "the prompts must pack pages for this test to mean anything"
    assert sched["blocks_per_page"] == layout.blocks_per_page
    if decode_pages:
        assert sched["packed_pages"] > prompt_pages
    else:
        assert sched["packed_pages"] >= prompt_pages
    leading = sum(p.start // BLOCK for p in plans if p)
    assert sched["freed_blocks"] == leading + sched["packed_pages"] * (layout.blocks_per_page - 1)
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def _matching_run(model_dir, settings: dict, seed: int, chunk: int,
                  max_tokens: int = MAX_TOKENS) -> dict:  # fmt: skip
    """vLLM at ``settings`` on the ``LENGTHS`` prompts of ``seed``, its tokens checked
    against the reference's; returns the run (``tokens``, ``scheduler``) and its prompts."""
    prompts = random_prompts(LENGTHS, seed=seed)
    result = generate(
        model_dir, prompts, max_tokens, max_num_batched_tokens=chunk,
        additional_config={"fastkv": settings}, **ENGINE,
    )  # fmt: skip
    assert_matches_reference(model_dir, prompts, [settings] * len(prompts), result["tokens"])
    return {**result, "prompts": prompts}


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("chunk", [64, 1024], ids=["chunk64", "unchunked"])
def test_low_bit_matches_reference(tiny_llama, bits, chunk):
    settings = {**LOW_BIT, "kv_bits": bits}
    result = _matching_run(tiny_llama, settings, seed=4, chunk=chunk)
    _check_blocks(tiny_llama, settings, result["scheduler"], decode_pages=False)


@pytest.mark.parametrize("bits", [4, 2])
def test_mixed_precision_matches_reference(tiny_llama, bits):
    """Evicted entries kept at low bits instead of dropped (``evicted_bits``, MiKV's idea):
    vLLM's greedy tokens equal the reference's decoding from
    :func:`~vllm_fastkv.reference.keep_evicted_low_bit` in the engine's slot layout, with
    chunked prefill; the scheduler frees ``R - 1`` blocks of every page of evicted
    entries and none before ``S``, packs nothing while decoding, and gets every block
    back. The evicted entries count: the reference's tokens without them differ."""
    settings = {"retain_rate": 0.25, "tsp_rate": 1.0, "evicted_bits": bits}
    result = _matching_run(tiny_llama, settings, seed=7, chunk=64)
    _check_blocks(tiny_llama, settings, result["scheduler"], decode_pages=False)
    layout = packed_layout(AutoConfig.from_pretrained(tiny_llama), settings)
    plans = [plan_retention(FastKVConfig.validated(settings), n, BLOCK, layout.page_tokens)
             for n in LENGTHS]  # fmt: skip
    assert result["scheduler"]["packed_pages"] == sum(p.packed_pages for p in plans if p)
    model = load(tiny_llama)
    dropped = {**settings, "evicted_bits": 0}
    assert any(
        reference_tokens(model, ids, dropped, MAX_TOKENS) != out
        for ids, out in zip(result["prompts"], result["tokens"])
    )


def test_low_bit_packs_pages_while_decoding(tiny_llama):
    """Long generations: every request packs further pages as it decodes (at 4 bits a page
    is 80 tokens here), each in the step its slots allow, as the reference does."""
    settings = {**LOW_BIT, "kv_bits": 4}
    result = _matching_run(tiny_llama, settings, seed=6, chunk=64, max_tokens=120)
    _check_blocks(tiny_llama, settings, result["scheduler"], decode_pages=True)


def test_low_bit_with_propagation(tiny_qwen2):
    """Packed pages in the layers after tsp_layer too (their block tables are shifted to
    the propagated tokens), in a batch with decodes of packed requests."""
    settings = WITH_PROPAGATION
    result = _matching_run(tiny_qwen2, settings, seed=5, chunk=100)
    sched = result["scheduler"]
    assert sched["propagated_prompts"] >= 3
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def _fp16_rounded(model):
    """A copy of ``model`` with its weights rounded to fp16: an fp16 engine's noise."""
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for param in noisy.parameters():
            param.copy_(param.half().float())
    return noisy


def test_gpu_criterion_accepts_fp16_noise_and_rejects_a_wrong_cache(tiny_llama):
    """The GPU criterion on CPU: the reference with its weights rounded to fp16 (an fp16
    engine's noise, which moves a few packed codes by a whole step) agrees with the fp32
    reference over 120 packing steps at 4 bits; tokens decoded from a cache with other
    entries (another retain rate) do not."""
    model = load(tiny_llama)
    noisy = _fp16_rounded(model)
    settings = {**LOW_BIT, "kv_bits": 4}
    prompts = random_prompts(LENGTHS, seed=6)
    noisy_tokens = [reference_tokens(noisy, ids, settings, 120) for ids in prompts]
    assert_gaps_agree(logit_gaps(model, prompts, [settings] * len(prompts), noisy_tokens),
                      low_bit=True)  # fmt: skip
    other = {**settings, "retain_rate": 0.25}
    wrong = [reference_tokens(model, ids, other, 120) for ids in prompts]
    with pytest.raises(AssertionError):
        assert_gaps_agree(logit_gaps(model, prompts, [settings] * len(prompts), wrong),
                          low_bit=True)  # fmt: skip


def test_gpu_criterion_on_a_short_low_bit_run_with_propagation(tiny_qwen2):
    """The same for test_low_bit_with_propagation's 12-step run, where the criterion
    allows no miss without the low-bit allowance: fp16-rounded weights pass with it, a
    cache that propagated 80% of the prompt instead of 60% fails with it."""
    model = load(tiny_qwen2)
    noisy = _fp16_rounded(model)
    prompts = random_prompts(LENGTHS, seed=5)
    settings = [WITH_PROPAGATION] * len(prompts)
    noisy_tokens = [reference_tokens(noisy, ids, WITH_PROPAGATION, MAX_TOKENS) for ids in prompts]
    assert_gaps_agree(logit_gaps(model, prompts, settings, noisy_tokens), low_bit=True)
    other = {**WITH_PROPAGATION, "tsp_rate": 0.8}
    wrong = [reference_tokens(model, ids, other, MAX_TOKENS) for ids in prompts]
    with pytest.raises(AssertionError):
        assert_gaps_agree(logit_gaps(model, prompts, settings, wrong), low_bit=True)


def test_quantization_changes_the_output(tiny_llama):
    """Guard: at these settings 2-bit KV changes the reference's tokens, so the equality
    above could not hold with the packed pages ignored or read as full precision."""
    model = load(tiny_llama)
    prompts = random_prompts([640, 900], seed=4)
    plain = [reference_tokens(model, ids, LOW_BIT, MAX_TOKENS) for ids in prompts]
    packed = [reference_tokens(model, ids, {**LOW_BIT, "kv_bits": 2}, MAX_TOKENS)
              for ids in prompts]  # fmt: skip
    assert plain != packed


@pytest.mark.parametrize(
    "settings, max_tokens",
    [({**LOW_BIT, "kv_bits": 4, "kv_residual": 128}, 300),
     ({"retain_rate": 0.5, "tsp_rate": 1.0, "evicted_bits": 2}, 120)],
    ids=["kv_bits", "evicted_bits"],
)  # fmt: skip
def test_low_bit_preemption_under_a_small_pool(tiny_llama, settings, max_tokens):
    """More long requests than the pool holds, packing pages as they decode (kv_bits) or
    at compression (evicted_bits, whose requests hold more blocks: preempted sooner):
    preempted requests are recomputed from scratch (and packed again), all finish, and
    every block comes back."""
    assert run_under_a_small_pool(tiny_llama, settings, max_tokens)["packed_pages"] > 0
