"""Token-selective propagation planning: layouts, the buffer allocator, the late batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_fastkv.config import FastKVConfig, FastKVConfigError
from vllm_fastkv.engine_config import PROPAGATION_CUSTOM_OPS, _check_propagation
from vllm_fastkv.propagation import late_layout
from vllm_fastkv.retention import (
    PromptPropagation,
    PromptRetention,
    RetentionStepPlan,
    plan_propagation,
    plan_retention,
)
from vllm_fastkv.retention_scheduler import SpanAllocator

BLOCK = 16


@given(
    prompt_len=st.integers(1, 200_000),
    retain=st.floats(0.01, 1.0),
    tsp=st.floats(0.01, 1.0),
    block_size=st.sampled_from([16, 32, 128]),
)
def test_propagation_layout_invariants(prompt_len, retain, tsp, block_size):
    settings = FastKVConfig.validated({"retain_rate": retain, "tsp_rate": tsp})
    retained = plan_retention(settings, prompt_len, block_size)
    plan = plan_propagation(settings, retained, block_size)
    if plan is None:
        return
    # P tokens at [S_p, S_p + P) inside the prompt's slots, block aligned, and the later
    # layers' retained entries [S, T) are among them, to the right of S_p.
    assert retained is not None and plan.start % block_size == 0
    assert 0 <= plan.start <= retained.start
    assert retained.kept <= plan.count < prompt_len
    assert plan.start + plan.count <= prompt_len


def test_no_propagation_without_retention_or_with_rate_one():
    settings = FastKVConfig.validated({"retain_rate": 0.25, "tsp_rate": 0.4})
    assert plan_propagation(settings, None, BLOCK) is None
    off = FastKVConfig.validated({"retain_rate": 0.25, "tsp_rate": 1.0, "mode": "constant"})
    assert plan_propagation(off, plan_retention(off, 4000, BLOCK), BLOCK) is None
    recency = FastKVConfig.validated({"tsp_rate": 0.2, "selection": "recency"})
    assert not recency.propagates
    # A budget above P leaves the prompt on retention alone.
    tight = FastKVConfig.validated({"retain_rate": 0.5, "tsp_rate": 0.3})
    assert plan_propagation(tight, plan_retention(tight, 1000, BLOCK), BLOCK) is None


def test_span_allocator_first_fit_and_reuse():
    spans = SpanAllocator(100)
    a, b = spans.allocate(40), spans.allocate(40)
    assert (a, b) == (0, 40) and spans.allocate(30) is None
    spans.free(a)
    assert spans.allocate(30) == 0 and spans.allocate(10) == 30
    assert spans.used == 80 and spans.allocate(21) is None
    assert SpanAllocator(0).allocate(1) is None


def _common(query_lens: list[int], seq_lens: list[int], blocks_per_row: int):
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    rows = len(query_lens)
    table = torch.arange(rows * blocks_per_row, dtype=torch.int32).view(rows, blocks_per_row)
    table = table.flip(1).contiguous()  # physical blocks not in logical order
    slots = []
    for row, (q, s) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(s - q, s):
            slots.append(int(table[row, pos // BLOCK]) * BLOCK + pos % BLOCK)
    return CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=rows,
        num_actual_tokens=int(starts[-1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
    )  # fmt: skip


def test_late_layout_of_a_mixed_step():
    """Row 0 decodes, row 1 is a non-final chunk (stashed), row 2 completes and propagates,
    row 3 is another request's prefill chunk that passes through."""
    query_lens, seq_lens = [1, 64, 100, 50], [300, 64, 400, 50]
    common = _common(query_lens, seq_lens, blocks_per_row=26)
    retained = PromptRetention(prompt_len=400, start=352, packed_pages=1)
    propagation = PromptPropagation(count=80, start=320, chunk_start=300, buffer_offset=1000)
    plan = RetentionStepPlan(
        compress={"c": retained}, starts={"d": 256}, packed={"d": 2},
        propagate={"c": propagation}, stash={"s": (0, 500)},
    )  # fmt: skip
    step = SimpleNamespace(req_ids=["d", "s", "c", "o"], plan=plan)
    layout = late_layout(common, step, BLOCK)
    late = layout.common

    assert layout.stash == [(1, 64, 500)]
    assert late.num_reqs == 3 and late.num_actual_tokens == 1 + 80 + 50
    assert late.query_start_loc_cpu.tolist() == [0, 1, 81, 131]
    assert late.seq_lens.tolist() == [300, 320 + 80, 50]
    assert layout.starts == [256, 320, 0]
    # The decoding row keeps its packed pages; the propagated one packs its own later.
    assert layout.packed == [2, 0, 0]
    # The propagated row scores its 80 tokens and keeps T - S = 48 of them at [S, T),
    # i.e. from S - S_p = 32 in its shifted view, and packs one page from there.
    assert layout.compress == [(1, 80, 32, 48, 1)]
    assert layout.keep_src.tolist() == [0, *range(165, 215)]
    assert layout.keep_dst.tolist() == [0, *range(81, 131)]
    row = layout.propagated[0]
    coordinates = (row.row, row.late_row, row.token_start, row.token_end, row.late_start)
    assert coordinates == (2, 1, 65, 165, 1)
    table = common.block_table_tensor[2]
    expected = [int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in range(320, 400)]
    assert late.slot_mapping[1:81].tolist() == expected
    assert torch.equal(late.slot_mapping[layout.keep_dst], common.slot_mapping[layout.keep_src])


def _engine(**overrides):
    config = SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, use_ubatching=False),
        lora_config=None,
        kv_transfer_config=None,
        compilation_config=SimpleNamespace(cudagraph_mode=None, custom_ops=["none"]),
    )
    for path, value in overrides.items():
        target, _, name = path.rpartition(".")
        setattr(getattr(config, target) if target else config, name, value)
    return config


def test_propagation_keeps_fused_ops_for_eager_steps():
    config = _engine()
    _check_propagation(config)
    enabled = [f"+{op}" for op in PROPAGATION_CUSTOM_OPS]
    assert config.compilation_config.custom_ops == ["none", *enabled]
    chosen = _engine(**{"compilation_config.custom_ops": ["none", "-silu_and_mul"]})
    _check_propagation(chosen)
    assert "+silu_and_mul" not in chosen.compilation_config.custom_ops


def test_eager_steps_put_vllm_kernels_first_for_ir_ops():
    """RMSNorm dispatches through vLLM IR: the propagating steps rank vLLM's CUDA kernels
    before the native torch version that compiled steps use, keeping other providers the
    user put first; on a CPU (no ``vllm_c``) dispatch stays native."""
    from vllm import ir
    from vllm.config.kernel import IrOpPriorityConfig

    from vllm_fastkv.propagation import eager_ir_priority

    configured = IrOpPriorityConfig(rms_norm=["native"], fused_add_rms_norm=["oink", "native"])
    eager = eager_ir_priority(SimpleNamespace(kernel_config=SimpleNamespace(
        ir_op_priority=configured)))  # fmt: skip
    assert eager.rms_norm == ["vllm_c", "native"]
    assert eager.fused_add_rms_norm == ["oink", "vllm_c", "native"]
    with eager.set_priority():
        expected = ["vllm_c", "native"] if torch.cuda.is_available() else ["native"]
        assert ir.ops.rms_norm.get_priority() == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"parallel_config.pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"lora_config": object()}, "LoRA"),
        ({"kv_transfer_config": object()}, "KV connectors"),
        ({"parallel_config.use_ubatching": True}, "micro-batching"),
    ],
)
def test_refused_combinations_name_the_way_out(override, message):
    with pytest.raises(FastKVConfigError, match=f"{message}.*tsp_rate=1.0"):
        _check_propagation(_engine(**override))


def test_full_cudagraphs_are_refused():
    from vllm.config import CUDAGraphMode

    with pytest.raises(FastKVConfigError, match="cudagraph_mode=FULL"):
        _check_propagation(_engine(**{"compilation_config.cudagraph_mode": CUDAGraphMode.FULL}))


def test_views_of_packed_rows():
    """With low-bit KV, a packed decode row reads from its start slot like any compressed
    row. In a mixed batch vLLM's attention sees one token of it and the packed attention
    the real length, and the other rows are marked -1 (vLLM's); in a batch of single-token
    decode rows the packed attention takes every row and vLLM's is skipped. A page packed
    after this step's attention is named per row, by its index in the shifted table (-1:
    none, padding rows included); a packed row with several queries is refused (packed
    rows attend one query each)."""
    from vllm_fastkv.packed_layout import LowBitLayout
    from vllm_fastkv.retention_metadata import RetentionViews

    settings = FastKVConfig.validated({"retain_rate": 0.25, "kv_bits": 2})
    layout = LowBitLayout.for_cache(torch.empty(1, BLOCK, 2, 64), 2, 32)  # fp32: R = 9
    stage = torch.empty(4, layout.page_bytes // 4, dtype=torch.int32)
    views = RetentionViews(settings, 4, BLOCK, torch.device("cpu"), layout, stage)
    common = _common([1, 1, 30], [300, 120, 30], blocks_per_row=20)
    shifted, packed = views.apply(common, starts=[32, 96, 0], packed=[1, 0, 0], pack=[(0, 0)])
    assert shifted.seq_lens.tolist() == [1, 120 - 96, 30] and not packed.attends_all
    assert packed.pages.tolist() == [1, -1, -1] and packed.seq_lens.tolist() == [268, 24, 30]
    assert torch.equal(packed.block_table[0, :6], common.block_table_tensor[0, 2:8])
    assert packed.pack_pages.tolist() == [0, -1, -1]
    # Buffers are rewritten every step: a step without packed rows clears them.
    _, packed = views.apply(common, starts=[32, 96, 0], packed=[])
    assert packed.pages.tolist() == [-1, -1, -1] and packed.pack_pages.tolist() == [-1] * 3
    decode = _common([1, 1, 1], [300, 120, 30], blocks_per_row=20)
    shifted, packed = views.apply(decode, starts=[32, 96, 0], packed=[1, 0], pack=[(1, 0)])
    assert packed.attends_all and packed.pages.tolist() == [1, 0, 0]
    assert packed.pack_pages.tolist() == [-1, 0, -1]
    assert shifted.seq_lens.tolist() == packed.seq_lens.tolist() == [268, 24, 30]
    with pytest.raises(RuntimeError, match="decode only"):
        views.apply(common, starts=[0, 0, 0], packed=[0, 0, 1])
    plain = RetentionViews(FastKVConfig.validated({"retain_rate": 0.25}), 4, BLOCK,
                           torch.device("cpu"))  # fmt: skip
    assert plain.apply(common, [224, 96, 0], [])[1] is None


def test_low_bit_keeps_full_cudagraphs_for_single_token_decode_only():
    """A full graph captured from a batch of single-token decode rows has no call of
    vLLM's attention (the packed-KV kernel attends every row), so with low-bit KV the
    builder allows full graphs of such batches only; without it, vLLM's level stands."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from vllm_fastkv.attention_backend import FastKVTritonMetadataBuilder

    def support(fastkv: dict) -> AttentionCGSupport:
        section = FastKVConfig.validated(fastkv).model_dump()
        config = SimpleNamespace(additional_config={"fastkv": section})
        return FastKVTritonMetadataBuilder.get_cudagraph_support(config, None)

    stock = TritonAttentionMetadataBuilder.get_cudagraph_support(SimpleNamespace(), None)
    assert stock == AttentionCGSupport.ALWAYS
    assert support({"retain_rate": 0.1}) == stock
    assert support({"retain_rate": 0.1, "kv_bits": 2}) == (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )
