"""KV retention inside vLLM: the compressed cache decodes exactly like the torch reference.

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
  ``GPU_MEAN_GAP``, and most prompts greedy up to ``GPU_LOGIT_TOLERANCE`` on every step.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.engines import generate
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.reference import fastkv_prefill, forced_decode_logits, greedy_decode
from vllm_fastkv.retention import plan_retention

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


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 1024) for _ in range(n)] for n in lengths]


def _kept(settings: dict, prompt_len: int) -> int:
    """Entries vLLM keeps per layer and head: the budget rounded up to whole blocks."""
    plan = plan_retention(FastKVConfig.validated(settings), prompt_len, BLOCK)
    return prompt_len if plan is None else plan.kept


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prefill(model, ids: list[int], settings: dict):
    """The reference prefill at vLLM's block-rounded budget (retention only)."""
    policy = "recency" if settings.get("selection") == "recency" else "fastkv"
    return fastkv_prefill(
        model, ids, policy=policy, mode="constant", max_capacity_prompt=_kept(settings, len(ids)),
        tsp_rate=1.0, tsp_len=len(ids),
    )  # fmt: skip


def _logit_gaps(
    model, prompts, settings: list[dict], tokens: list[list[int]]
) -> list[torch.Tensor]:
    """Per prompt and step: reference max logit - logit of the token vLLM chose."""
    gaps = []
    for ids, s, out in zip(prompts, settings, tokens):
        logits = forced_decode_logits(model, _prefill(model, ids, s), out)
        chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
        gaps.append(logits.max(dim=-1).values - chosen)
    return gaps


def assert_matches_reference(model_dir, prompts, settings: list[dict], tokens) -> None:
    model = _load(model_dir)
    if ON_GPU:
        gaps = _logit_gaps(model, prompts, settings, tokens)
        means = [round(g.mean().item(), 3) for g in gaps]
        worst = [round(g.max().item(), 3) for g in gaps]
        assert max(means) <= GPU_MEAN_GAP, (means, worst)
        assert sum(w <= GPU_LOGIT_TOLERANCE for w in worst) * 2 > len(worst), (means, worst)
    else:
        expected = [
            greedy_decode(model, _prefill(model, ids, s), MAX_TOKENS).tolist()
            for ids, s in zip(prompts, settings)
        ]
        assert tokens == expected


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
    prompts = _prompts(lengths)
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
    starts = [n - _kept(settings, n) for n in lengths]
    assert sched["compressed_prompts"] == sum(s > 0 for s in starts) == 5
    assert sched["kept_tokens"] == sum(n - s for n, s in zip(lengths, starts) if s > 0)
    # Exactly the leading blocks before each start went back to the pool ...
    assert sched["freed_blocks"] == sum(s // BLOCK for s in starts)
    # ... and nothing leaked or was freed twice once all requests finished.
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def test_compression_changes_the_output(tiny_llama):
    """Guard for the checks above: at these settings a cache that was not compressed
    (or compressed wrongly) fails them by a wide margin."""
    model = _load(tiny_llama)
    prompts = _prompts([150, 300])
    full = [greedy_decode(model, _prefill(model, ids, {"enabled": False}), MAX_TOKENS).tolist()
            for ids in prompts]  # fmt: skip
    kept = [greedy_decode(model, _prefill(model, ids, RETENTION), MAX_TOKENS).tolist()
            for ids in prompts]  # fmt: skip
    assert full != kept
    gaps = _logit_gaps(model, prompts, [RETENTION] * 2, full)
    assert min(g.mean().item() for g in gaps) > 2 * GPU_MEAN_GAP, gaps


def test_per_request_overrides(tiny_llama):
    """``extra_args["fastkv"]`` changes one request's budget or turns retention off."""
    prompts = _prompts([300, 300, 300], seed=1)
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
    lengths = [300, 333, 310, 290, 320, 305, 315, 298]
    prompts = _prompts(lengths, seed=2)
    result = generate(
        tiny_llama, prompts, 48, max_num_batched_tokens=128, num_gpu_blocks_override=64,
        max_num_seqs=8, additional_config={"fastkv": RETENTION}, **ENGINE,
    )  # fmt: skip
    sched = result["scheduler"]
    assert sched["preemptions"] > 0
    assert [len(t) for t in result["tokens"]] == [48] * len(prompts)
    assert sched["free_blocks_end"] == sched["free_blocks_start"]
    assert sched["compressed_prompts"] >= len(prompts)
