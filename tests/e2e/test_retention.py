"""KV retention inside vLLM: the compressed cache decodes exactly like the torch reference.

The reference (:mod:`vllm_fastkv.reference`) scores, selects and decodes on dense
tensors; vLLM compresses the paged cache in place, frees whole blocks and decodes on what
is left. Equal greedy tokens on random-weight models (where a single different retained
entry changes the continuation) prove the same entries were kept for every layer and KV
head, and that decode reads exactly them at the right positions.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.e2e.engines import generate
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.reference import generate as reference_generate
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
    # FlashAttention (FASTKV's base on GPUs) runs half precision only.
    dtype="bfloat16" if ON_GPU else "float32",
    seed=0,
    enforce_eager=True,
    attention_backend="FASTKV",
)
#: Token-exact comparisons with the fp32 torch reference need fp32 engines (CPU).
exact_reference = pytest.mark.skipif(ON_GPU, reason="bf16 on GPUs; the reference is fp32")


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 1024) for _ in range(n)] for n in lengths]


def _kept(settings: dict, prompt_len: int) -> int:
    """Entries vLLM keeps per layer and head: the budget rounded up to whole blocks."""
    plan = plan_retention(FastKVConfig.validated(settings), prompt_len, BLOCK)
    return prompt_len if plan is None else plan.kept


def _reference(model_dir, prompts: list[list[int]], settings: list[dict]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokens = []
    for ids, s in zip(prompts, settings):
        kept = _kept(s, len(ids))
        out = reference_generate(
            model, ids, MAX_TOKENS, policy="fastkv", mode="constant", max_capacity_prompt=kept,
            tsp_rate=1.0, tsp_len=len(ids),
        )  # fmt: skip
        tokens.append(out.tolist())
    return tokens


@exact_reference
@pytest.mark.parametrize(
    ("model_fixture", "chunk"),
    [("tiny_llama", 64), ("tiny_llama", 1024), ("tiny_qwen2", 48)],
    ids=["llama-chunk64", "llama-unchunked", "qwen2-chunk48"],
)
def test_retention_matches_reference(request, model_fixture, chunk):
    model = request.getfixturevalue(model_fixture)
    # Short prompts stay whole; 131 = 2 x 64 + 3 would end in a 3-token chunk at chunk 64,
    # which the scheduler lengthens to the 8-token window.
    lengths = [20, 131, 150, 300, 333, 517]
    prompts = _prompts(lengths)
    result = generate(
        model, prompts, MAX_TOKENS, max_num_batched_tokens=chunk,
        additional_config={"fastkv": RETENTION}, **ENGINE,
    )  # fmt: skip
    assert result["backends"] == ["FASTKV"]
    assert result["tokens"] == _reference(model, prompts, [RETENTION] * len(prompts))

    sched = result["scheduler"]
    starts = [n - _kept(RETENTION, n) for n in lengths]
    assert sched["compressed_prompts"] == sum(s > 0 for s in starts) == 5
    assert sched["kept_tokens"] == sum(n - s for n, s in zip(lengths, starts) if s > 0)
    # Exactly the leading blocks before each start went back to the pool ...
    assert sched["freed_blocks"] == sum(s // BLOCK for s in starts)
    # ... and nothing leaked or was freed twice once all requests finished.
    assert sched["free_blocks_end"] == sched["free_blocks_start"]


def test_compression_changes_the_output(tiny_llama):
    """Guard for the test above: at these settings retention is not a no-op."""
    prompts = _prompts([300])
    full = _reference(tiny_llama, prompts, [{"enabled": False}])
    kept = _reference(tiny_llama, prompts, [RETENTION])
    assert full != kept


@exact_reference
def test_per_request_overrides(tiny_llama):
    """``extra_args["fastkv"]`` changes one request's budget or turns retention off."""
    prompts = _prompts([300, 300, 300], seed=1)
    overrides = [None, {"fastkv": {"retain_rate": 0.5}}, {"fastkv": {"enabled": False}}]
    result = generate(
        tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
        additional_config={"fastkv": RETENTION}, extra_args=overrides, **ENGINE,
    )  # fmt: skip
    settings = [RETENTION, {**RETENTION, "retain_rate": 0.5}, {"enabled": False}]
    assert result["tokens"] == _reference(tiny_llama, prompts, settings)
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


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and the Triton kernels need a GPU")
def test_retention_on_gpu_graphs_match_eager(tiny_llama):
    """GPU (V2 runner): Triton scoring/compaction, decode under CUDA graphs reading the
    shifted block tables, same tokens as eager mode, exact block accounting."""
    lengths = [20, 131, 300, 517, 333, 150]
    prompts = _prompts(lengths, seed=3)
    runs = {
        eager: generate(
            tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
            additional_config={"fastkv": RETENTION}, **{**ENGINE, "enforce_eager": eager},
        )  # fmt: skip
        for eager in (True, False)
    }
    assert runs[False]["tokens"] == runs[True]["tokens"]
    for result in runs.values():
        sched = result["scheduler"]
        starts = [n - _kept(RETENTION, n) for n in lengths]
        assert sched["freed_blocks"] == sum(s // BLOCK for s in starts)
        assert sched["free_blocks_end"] == sched["free_blocks_start"]
    # Compression is not a no-op here either.
    full = generate(
        tiny_llama, prompts, MAX_TOKENS, max_num_batched_tokens=64,
        additional_config={"fastkv": {"enabled": False}}, **ENGINE,
    )  # fmt: skip
    assert full["tokens"] != runs[True]["tokens"]
