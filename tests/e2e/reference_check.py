"""Helpers shared by the end-to-end FastKV tests: prompts, settings and the reference check.

The reference (:mod:`vllm_fastkv.reference`) scores, selects and decodes on dense
tensors; vLLM compresses the paged cache in place, frees whole blocks and decodes on what
is left. On random-weight models a single different retained entry changes the
continuation, so agreement proves the same entries were kept for every layer and KV head
and that decode reads exactly them at the right positions:

* CPU (fp32 engine): identical greedy tokens.
* GPU (fp16 FlashAttention, Triton kernels, V2 runner, CUDA graphs): teacher forcing. For
  each token vLLM picks, the gap between the fp32 reference's best logit and the logit of
  that token, on the reference's compressed cache. fp16 rounding moves scores that sit
  within 1e-4..1e-3 of the top-k boundary, so a long prompt may keep a few different
  entries and miss now and then; a wrong cache (rows mixed up, stale graph buffers, no
  compression) misses on every step by several logits. So: every prompt's mean gap below
  ``GPU_MEAN_GAP``, and most prompts greedy up to ``GPU_LOGIT_TOLERANCE`` on all but one in
  ``GPU_MISS_EVERY`` of their steps (none in the 12-step runs). Low-bit pages widen the
  noise: an fp16 key or value that sits near a code boundary lands on the other side of
  it than the fp32 reference's, a whole quantisation step away, so long generations that
  keep packing miss a few more steps; the reference with its weights rounded to fp16 (the
  engine's precision) shows it on CPUs (``test_gpu_criterion_*`` in test_low_bit_kv.py).
  So a low-bit run's prompts may each miss ``GPU_LOW_BIT_EXTRA_MISSES`` more steps: at 4
  bits with propagation, 12 steps, fp16-rounded weights alone miss one step of one prompt
  on CPU (gap 0.58) and an H200 engine 1, 1 and 2 steps of three (gaps up to 0.53), while
  a cache that propagated 80% instead of 60% misses 2-6 steps of every compressed prompt.
"""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from tests.e2e.engines import generate
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.packed_layout import LowBitLayout
from vllm_fastkv.reference import (
    LowBitStore,
    PrefillResult,
    fastkv_prefill,
    forced_decode_logits,
    greedy_decode,
    keep_evicted_low_bit,
)
from vllm_fastkv.retention import plan_propagation, plan_retention

BLOCK = 16
MAX_TOKENS = 12
#: Retention only (token-selective propagation is a separate mechanism).
RETENTION = {"retain_rate": 0.25, "tsp_rate": 1.0}
ON_GPU = torch.cuda.is_available()
ENGINE = dict(
    max_model_len=1024,
    block_size=BLOCK,
    enable_chunked_prefill=True,
    # FlashAttention (FASTKV's base on GPUs) runs half precision only; fp16 keeps its
    # noise far below the effect of a wrong cache (bf16's does not, on random weights).
    dtype="float16" if ON_GPU else "float32",
    seed=0,
    # GPUs: torch.compile and CUDA graphs (decode replays graphs over shifted tables).
    enforce_eager=not ON_GPU,
    attention_backend="FASTKV",
)
GPU_LOGIT_TOLERANCE = 0.5
GPU_MEAN_GAP = 1.5
GPU_MISS_EVERY = 20
GPU_LOW_BIT_EXTRA_MISSES = 1


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 1024) for _ in range(n)] for n in lengths]


def kept_entries(settings: dict, prompt_len: int) -> int:
    """Entries vLLM keeps per layer and head: the budget rounded up to whole blocks."""
    plan = plan_retention(FastKVConfig.validated(settings), prompt_len, BLOCK)
    return prompt_len if plan is None else plan.kept


def packed_layout(model_config, settings: dict) -> LowBitLayout:
    """The packed page layout vLLM uses for a model (its HF config) at ``settings``; the
    cache dtype is the engine's."""
    config = FastKVConfig.validated(settings)
    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads
    )
    cache = torch.empty(1, BLOCK, model_config.num_key_value_heads, head_dim,
                        dtype=getattr(torch, ENGINE["dtype"]))  # fmt: skip
    return LowBitLayout.for_cache(cache, config.packed_bits, config.kv_group_size)


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prefill(model, ids: list[int], settings: dict):
    """The reference prefill at vLLM's block-rounded budget and its propagation plan."""
    config = FastKVConfig.validated(settings)
    prompt_len = len(ids)
    retained = plan_retention(config, prompt_len, BLOCK)
    propagation = plan_propagation(config, retained, BLOCK)
    return fastkv_prefill(
        model, ids, policy="recency" if config.selection == "recency" else "fastkv",
        mode="constant", max_capacity_prompt=kept_entries(settings, prompt_len),
        tsp_layer=config.tsp_layer, tsp_rate=config.tsp_rate if propagation else 1.0,
        tsp_len=propagation.count if propagation else prompt_len,
        window=config.window, pool_kernel=config.pool_kernel, pooling=config.pooling,
    )  # fmt: skip


def stored_prefill(
    model, ids: list[int], settings: dict
) -> tuple[PrefillResult, LowBitStore | None]:
    """The reference prefill as vLLM's cache holds it after compression, and the low-bit
    store that keeps packing while decoding (None: 16 bits, mixed precision, whose pages
    hold only prompt entries, or a prompt that is not compressed and so never packed)."""
    config = FastKVConfig.validated(settings)
    result = prefill(model, ids, settings)
    if not config.quantizes or plan_retention(config, len(ids), BLOCK) is None:
        return result, None
    layout = packed_layout(model.config, settings)
    if config.keeps_evicted:
        full = fastkv_prefill(model, ids, policy="full")
        return keep_evicted_low_bit(
            full, result, bits=config.evicted_bits, value_group=layout.value_group,
            block_size=BLOCK, page_tokens=layout.page_tokens,
        ), None  # fmt: skip
    store = LowBitStore(
        bits=config.kv_bits, value_group=layout.value_group, residual=config.kv_residual,
        block_size=BLOCK, page_tokens=layout.page_tokens,
    )  # fmt: skip
    return store.prefill(result), store


def reference_tokens(model, ids: list[int], settings: dict, max_tokens: int) -> list[int]:
    """The reference's greedy continuation of ``ids`` as vLLM runs it at ``settings``."""
    result, store = stored_prefill(model, ids, settings)
    return greedy_decode(model, result, max_tokens, kv_store=store).tolist()


def run_under_a_small_pool(model_dir, settings: dict, max_tokens: int) -> dict:
    """Eight ~300-token requests in a 64-block pool: more than it holds, so compressed
    requests are preempted and recomputed. Checks that vLLM preempted, every request
    finished and every block came back; returns the scheduler's report."""
    prompts = random_prompts([300, 333, 310, 290, 320, 305, 315, 298], seed=2)
    result = generate(
        model_dir, prompts, max_tokens, max_num_batched_tokens=128, num_gpu_blocks_override=64,
        max_num_seqs=8, additional_config={"fastkv": settings}, **ENGINE,
    )  # fmt: skip
    sched = result["scheduler"]
    assert sched["preemptions"] > 0
    assert [len(t) for t in result["tokens"]] == [max_tokens] * len(prompts)
    assert sched["free_blocks_end"] == sched["free_blocks_start"]
    assert sched["compressed_prompts"] >= len(prompts)
    return sched


def logit_gaps(
    model, prompts, settings: list[dict], tokens: list[list[int]]
) -> list[torch.Tensor]:
    """Per prompt and step: reference max logit - logit of the token vLLM chose."""
    gaps = []
    for ids, s, out in zip(prompts, settings, tokens):
        result, store = stored_prefill(model, ids, s)
        logits = forced_decode_logits(model, result, out, kv_store=store)
        chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
        gaps.append(logits.max(dim=-1).values - chosen)
    return gaps


def assert_gaps_agree(gaps: list[torch.Tensor], *, low_bit: bool = False) -> None:
    """The GPU criterion (module docstring) over per-prompt, per-step logit gaps;
    ``low_bit``: the run stores packed low-bit pages."""
    means = [round(g.mean().item(), 3) for g in gaps]
    misses = [int((g > GPU_LOGIT_TOLERANCE).sum()) for g in gaps]
    extra = GPU_LOW_BIT_EXTRA_MISSES if low_bit else 0
    allowed = [len(g) // GPU_MISS_EVERY + extra for g in gaps]
    assert max(means) <= GPU_MEAN_GAP, (means, misses)
    agree = sum(m <= a for m, a in zip(misses, allowed, strict=True))
    assert agree * 2 > len(gaps), (means, misses, allowed)


def assert_matches_reference(model_dir, prompts, settings: list[dict], tokens) -> None:
    model = load(model_dir)
    if ON_GPU:
        low_bit = any(FastKVConfig.validated(s).quantizes for s in settings)
        assert_gaps_agree(logit_gaps(model, prompts, settings, tokens), low_bit=low_bit)
    else:
        expected = [
            reference_tokens(model, ids, s, len(out))
            for ids, s, out in zip(prompts, settings, tokens)
        ]
        assert tokens == expected
