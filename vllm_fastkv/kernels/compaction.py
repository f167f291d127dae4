"""In-place compaction of retained KV entries into a contiguous slot range (Triton).

After selection, sequence ``s`` keeps ``counts[s]`` entries per KV head; entry ``r`` moves
from logical token ``indices[s, h, r]`` to logical token ``starts[s] + r``. With
``starts[s] == 0`` (front compaction) the kept KV fills the sequence's first
``ceil(count / block_size)`` blocks and the tail blocks can be freed; with
``starts[s] == S = T - count`` (tail-aligned, ``S`` a multiple of the block size) it
fills ``[S, T)`` and the leading ``S / block_size`` blocks can be freed.

Why two launches over fully parallel tiles (proof in ``docs/kernels-notes.md``): a
destination slot may be the source of another entry, and a GPU gives no order between
programs, so a moving entry whose source lies inside the destination range
``[start, start + count)`` is first copied to a scratch buffer (launch 1, reads only), then
every moving entry is written from its scratch copy or, for a source outside that range
(which nothing overwrites), straight from the cache (launch 2). Entries already in place
(``indices[s, h, r] == starts[s] + r``, e.g. every entry of a prompt that kept
everything) are not touched. Data moves as raw integers of the element's width, so fp8
caches need no special case and no value is ever reinterpreted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_fastkv.kernels.reference import check_compaction_starts

# Kept entries per program, and its warps. On an H200 (Llama-3.1-8B heads, retain 10%,
# bench_kernels.py --tune) 64 entries with 2 warps were among the fastest of 16-256 x 2-8
# for both layouts at 32K and 128K tokens (1.45-1.62x the copy floor); 64 with 4 warps,
# the earlier default, took 1.7-2.3x.
_BLOCK_R = 64
_NUM_WARPS = 2
_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@triton.jit
def _slot_offsets(block_table_row_ptr, tok, mask, stride_b, stride_s, PAGE_SIZE: tl.constexpr):
    """Element offsets of logical tokens ``tok`` of one sequence in a cache tensor."""
    block = tl.load(block_table_row_ptr + tok // PAGE_SIZE, mask=mask, other=0).to(tl.int64)
    return block * stride_b + (tok % PAGE_SIZE) * stride_s


@triton.jit
def _move_rows(
    cache_ptr, stage_ptr, block_table_row_ptr, h, rank, src, dst, moving, staged, offs_d,
    d_mask, stride_b, stride_s, stride_h, stride_d,
    PAGE_SIZE: tl.constexpr, D_PAD: tl.constexpr, STAGE: tl.constexpr,
):
    """One launch's work on one cache tensor: stage endangered sources (``STAGE``), or
    write every moving entry to its destination. Scratch rows are indexed by the entry's
    rank ``r`` (``< max_keep``), never by its destination slot (up to ``start + count``)."""
    head = cache_ptr + h * stride_h + offs_d[None, :] * stride_d
    src_offs = _slot_offsets(block_table_row_ptr, src, moving, stride_b, stride_s, PAGE_SIZE)
    src_ptrs = head + src_offs[:, None]
    stage_ptrs = stage_ptr + rank[:, None] * D_PAD + offs_d[None, :]
    staged_mask = staged[:, None] & d_mask[None, :]
    if STAGE:
        tl.store(stage_ptrs, tl.load(src_ptrs, mask=staged_mask), mask=staged_mask)
    else:
        direct_mask = (moving & ~staged)[:, None] & d_mask[None, :]
        rows = tl.load(src_ptrs, mask=direct_mask, other=0)
        rows = tl.where(staged[:, None], tl.load(stage_ptrs, mask=staged_mask, other=0), rows)
        dst_offs = _slot_offsets(block_table_row_ptr, dst, moving, stride_b, stride_s, PAGE_SIZE)
        tl.store(head + dst_offs[:, None], rows, mask=moving[:, None] & d_mask[None, :])


@triton.jit
def _compact_kernel(
    key_ptr, value_ptr, stage_ptr, block_table_ptr, indices_ptr, counts_ptr, starts_ptr,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_is, stride_ih, stride_ir, stride_c, stride_st,
    max_keep, head_dim,
    PAGE_SIZE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, STAGE: tl.constexpr,
    HAS_STARTS: tl.constexpr,
):
    """Program (s, h, tile): kept entries ``r`` in the tile, K and V."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    count = tl.load(counts_ptr + s * stride_c)
    if HAS_STARTS:
        start = tl.load(starts_ptr + s * stride_st)
    else:
        start = 0
    rank = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rank < count
    src_ptrs = indices_ptr + s * stride_is + h * stride_ih + rank * stride_ir
    src = tl.load(src_ptrs, mask=live, other=0)
    dst = start + rank
    moving = live & (src != dst)
    # Sources inside [start, start + count) are destinations of other entries: stage them.
    staged = moving & (src >= start) & (src < start + count)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    block_table_row_ptr = block_table_ptr + s.to(tl.int64) * stride_bt
    stage = stage_ptr + (s * tl.num_programs(1) + h).to(tl.int64) * (2 * max_keep * D_PAD)
    _move_rows(key_ptr, stage, block_table_row_ptr, h, rank, src, dst, moving, staged, offs_d,
               d_mask, stride_kb, stride_ks, stride_kh, stride_kd, PAGE_SIZE, D_PAD, STAGE)
    _move_rows(value_ptr, stage + max_keep * D_PAD, block_table_row_ptr, h, rank, src, dst,
               moving, staged, offs_d, d_mask, stride_vb, stride_vs, stride_vh, stride_vd,
               PAGE_SIZE, D_PAD, STAGE)


def compact_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    starts: torch.Tensor | None = None,
) -> None:
    """Move each sequence's kept K/V entries to ``counts[s]`` consecutive logical slots
    from ``starts[s]`` on (default: from 0, the front), in place.

    Args:
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, any
            strides, any 1/2/4-byte dtype (fp8, fp16, bf16, fp32).
        block_table: int32 ``[>= num_seqs, max_blocks_per_seq]``. No block may appear twice
            among the compacted sequences' first ``T`` tokens (no shared prefix blocks).
        indices: int ``[num_seqs, num_kv_heads, max_keep]``: per head, strictly ascending
            logical token indices ``< T_s`` in the first ``counts[s]`` columns (the rest is
            ignored), as :func:`select_retained` returns.
        counts: ``[num_seqs]`` kept entries per sequence (``<= max_keep``).
        starts: int ``[num_seqs]`` first destination slot per sequence, or ``None`` (all
            zeros: front compaction). Precondition, per sequence with prompt length
            ``T_s``: ``starts[s] == 0`` or ``starts[s] + counts[s] == T_s`` (tail-aligned;
            the serving path uses ``T_s - counts[s]``, a multiple of the block size, so the
            leading blocks can be freed), with every source ``< T_s``. More generally the
            staging rule is safe whenever every source slot that is also a destination lies
            inside ``[starts[s], starts[s] + counts[s])``, which holds in both cases (the
            destinations are exactly that range), and the range lies in the sequence's own
            blocks (``starts[s] + counts[s] <= T_s``). Not checked on the device.

    Afterwards logical token ``starts[s] + r`` (``r < counts[s]``) of head ``h`` holds what
    token ``indices[s, h, r]`` held; every other slot keeps its data (stale or not).
    """
    num_seqs, num_kv_heads, max_keep = indices.shape
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError("key_cache and value_cache must share shape and dtype")
    if key_cache.shape[2] != num_kv_heads or counts.shape != (num_seqs,):
        raise ValueError("indices must be [num_seqs, num_kv_heads, max_keep] and counts [num_seqs]")
    check_compaction_starts(starts, num_seqs)
    if key_cache.element_size() not in _WORD_DTYPES:
        raise ValueError(f"unsupported cache dtype {key_cache.dtype}")
    if num_seqs == 0 or max_keep == 0:
        return
    word = _WORD_DTYPES[key_cache.element_size()]
    key, value = key_cache.view(word), value_cache.view(word)
    stage = _new_stage(key, indices)
    # Launch order is the safety argument: every staging read ends before any write.
    for stage_phase in (True, False):
        _run_phase(
            key, value, stage, block_table, indices, counts, starts=starts, stage_phase=stage_phase
        )


def _new_stage(key: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Scratch rows ``[num_seqs, num_kv_heads, 2 (K, V), max_keep, D_PAD]`` of ``key``'s
    dtype, indexed by entry rank ``r < max_keep`` (not by destination slot)."""
    d_pad = triton.next_power_of_2(key.shape[3])
    num_seqs, num_kv_heads, max_keep = indices.shape
    shape = (num_seqs, num_kv_heads, 2, max_keep, d_pad)
    return torch.empty(shape, dtype=key.dtype, device=key.device)


def _run_phase(
    key: torch.Tensor,
    value: torch.Tensor,
    stage: torch.Tensor,
    block_table: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    stage_phase: bool,
    starts: torch.Tensor | None = None,
) -> None:
    """One launch over all kept entries: staging (``stage_phase``) or writing."""
    num_seqs, num_kv_heads, max_keep = indices.shape
    has_starts = starts is not None
    # Without starts the kernel never reads the pointer; counts stands in for it.
    starts_arg = starts if has_starts else counts
    _compact_kernel[(num_seqs, num_kv_heads, triton.cdiv(max_keep, _BLOCK_R))](
        key, value, stage, block_table, indices, counts, starts_arg,
        *key.stride(), *value.stride(),
        block_table.stride(0), *indices.stride(), counts.stride(0), starts_arg.stride(0),
        max_keep, key.shape[3],
        PAGE_SIZE=key.shape[1], D_PAD=stage.shape[-1], BLOCK_R=_BLOCK_R, STAGE=stage_phase,
        HAS_STARTS=has_starts, num_warps=_NUM_WARPS,
    )
