"""FastKV window scoring straight from vLLM's paged KV cache (Triton).

The score of token ``j`` is the softmax mass that the last ``window`` prompt queries put
on it, pooled along tokens per query head, then summed over each KV head's query group
(semantics: :func:`vllm_fastkv.kernels.reference.window_scores_ref`).

Why three kernels and no ``[heads, window, T]`` probability tensor:

1. ``_lse_partial_kernel``: per (sequence, KV head, key split) an online softmax over the
   split's key tiles gives each window-query row its partial log-sum-exp. Splitting the
   keys keeps an H100 busy for a single 128K-token sequence (8 KV heads alone would be 8
   programs); ``_merge_lse_kernel`` merges the splits.
2. ``_window_mass_kernel``: per (sequence, KV head, token tile) recompute the logits,
   normalise them with the row log-sum-exp and sum over the window queries, giving
   per-*query*-head mass ``[num_seqs, num_q_heads, T - window]`` in fp32. Before the window
   every window query sees every key, so this pass needs no causal mask.
3. ``_pool_group_kernel``: pool each query head's mass along tokens, then sum the group.
   Max pooling does not commute with the group sum, hence per-query-head mass in step 2.

Each program of steps 1-2 holds a KV head's whole query group (``group x window`` rows)
against one key tile, so a key tile is read once per KV head, not once per query head.
The keys are read twice in total (steps 1 and 2); that is the floor of any exact
two-pass softmax that never stores per-query probabilities.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_fastkv.kernels.reference import Pooling, check_scoring_args, scored_width

# Key tokens per tile in steps 1 and 2 (with their warps and pipeline stages), and scored
# tokens per program in step 3. On an H100 at 128K tokens each of steps 1-2 runs at ~85% of
# copy bandwidth with these; a sweep of 32/64/128 x 4/8 warps x 2-4 stages found no clear
# winner.
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 3
_BLOCK_POOL = 256
# Step 1 aims for this many programs per SM (on a CPU, the interpreter: a fixed count).
_PROGRAMS_PER_SM = 4
_PROGRAMS_WITHOUT_GPU = 16
# tl.dot needs at least 16 rows.
_MIN_DOT_ROWS = 16


@triton.jit
def _load_window_queries(
    query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
    window, group, offs_m, offs_d, d_mask,
    W_PAD: tl.constexpr,
):
    """The query group of KV head ``h`` as rows ``m = g * W_PAD + i`` (head ``h*group+g``,
    window query ``i``); padded rows are zero and flagged invalid."""
    g = offs_m // W_PAD
    i = offs_m % W_PAD
    row_valid = (g < group) & (i < window)
    ptrs = (query_ptr + s * stride_qs + i[:, None] * stride_qw
            + (h * group + g)[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    return q, row_valid


@triton.jit
def _key_tile_logits(
    q, key_cache_ptr, block_table_row_ptr, h, tok, tok_mask,
    stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask, qk_scale,
    PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Logits (log2 units) of the query rows ``q`` against logical tokens ``tok``.

    Keys are gathered through the block table; masked tokens read as zero keys."""
    block = tl.load(block_table_row_ptr + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
    ptrs = (key_cache_ptr + block[:, None] * stride_kb + (tok % PAGE_SIZE)[:, None] * stride_ks
            + h * stride_kh + offs_d[None, :] * stride_kd)
    k = tl.load(ptrs, mask=tok_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _lse_partial_kernel(
    query_ptr, key_cache_ptr, block_table_ptr, seq_lens_ptr, partial_ptr,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_bt,
    window, group, head_dim, qk_scale, tiles_per_split,
    PAGE_SIZE: tl.constexpr, W_PAD: tl.constexpr, M: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Step 1: ``partial[s, h, split, m] = log2 sum_t 2^logit[m, t]`` over the split's
    visible keys (about ``-1e30`` if it has none)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    q, _ = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
                                window, group, offs_m, offs_d, d_mask, W_PAD)
    block_table_row_ptr = block_table_ptr + s.to(tl.int64) * stride_bt
    # Window query i sits at position seq_len - window + i and sees keys up to it.
    last_key = seq_len - window + offs_m % W_PAD
    # A finite floor keeps 2^(logit - max) at 0, not NaN, while a row has seen no key.
    row_max = tl.full([M], -1e30, tl.float32)
    row_sum = tl.zeros([M], tl.float32)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    for tile_start in range(start, end, BLOCK_N):
        tok = tile_start + tl.arange(0, BLOCK_N)
        logits = _key_tile_logits(q, key_cache_ptr, block_table_row_ptr, h, tok, tok < end,
                                  stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask,
                                  qk_scale, PAGE_SIZE, DOT_PRECISION)
        logits = tl.where(tok[None, :] <= last_key[:, None], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        tile_sum = tl.sum(tl.exp2(logits - new_max[:, None]), axis=1)
        row_sum = row_sum * tl.exp2(row_max - new_max) + tile_sum
        row_max = new_max
    # A row that saw a key has row_sum >= 1 (its maximum adds 2^0), so the clamp only
    # turns rows without keys into about -1e30, which weighs 0 in the merge.
    out = partial_ptr + ((s * tl.num_programs(1) + h) * tl.num_programs(2) + split) * M + offs_m
    tl.store(out, row_max + tl.log2(tl.maximum(row_sum, 1.0)))


@triton.jit
def _merge_lse_kernel(partial_ptr, lse_ptr, num_splits, M: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """``lse[s, h, m]``: log2-sum-exp of ``partial[s, h, :, m]`` over the key splits."""
    row = tl.program_id(0)  # flat (s, h)
    offs_split = tl.arange(0, SPLITS_PAD)
    offs_m = tl.arange(0, M)
    ptrs = partial_ptr + (row * num_splits + offs_split[:, None]) * M + offs_m[None, :]
    part = tl.load(ptrs, mask=offs_split[:, None] < num_splits, other=float("-inf"))
    top = tl.max(part, axis=0)
    lse = top + tl.log2(tl.sum(tl.exp2(part - top[None, :]), axis=0))
    tl.store(lse_ptr + row * M + offs_m, lse)


@triton.jit
def _window_mass_kernel(
    query_ptr, key_cache_ptr, block_table_ptr, seq_lens_ptr, lse_ptr, mass_ptr,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_bt, stride_ms, stride_mh,
    window, group, head_dim, qk_scale,
    PAGE_SIZE: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Step 2: ``mass[s, q, j] = sum_i softmax_row(q, i)[j]`` for the tile's tokens
    ``j < T - window``; other entries are left untouched."""
    M: tl.constexpr = G_PAD * W_PAD
    s = tl.program_id(0)
    h = tl.program_id(1)
    num_scored = tl.load(seq_lens_ptr + s) - window
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    q, row_valid = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
                                        window, group, offs_m, offs_d, d_mask, W_PAD)
    lse = tl.load(lse_ptr + (s * tl.num_programs(1) + h) * M + offs_m)
    tok = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_mask = tok < num_scored
    logits = _key_tile_logits(q, key_cache_ptr, block_table_ptr + s.to(tl.int64) * stride_bt, h,
                              tok, tok_mask, stride_kb, stride_ks, stride_kh, stride_kd,
                              offs_d, d_mask, qk_scale, PAGE_SIZE, DOT_PRECISION)
    # logit <= lse in exact arithmetic; the clamp only keeps rows that saw no key
    # (lse ~ -1e30, prompts shorter than the window) from overflowing.
    probs = tl.where(row_valid[:, None], tl.exp2(tl.minimum(logits - lse[:, None], 0.0)), 0.0)
    mass = tl.sum(tl.reshape(probs, [G_PAD, W_PAD, BLOCK_N]), axis=1)
    offs_g = tl.arange(0, G_PAD)
    ptrs = mass_ptr + s * stride_ms + (h * group + offs_g)[:, None] * stride_mh + tok[None, :]
    tl.store(ptrs, mass, mask=(offs_g < group)[:, None] & tok_mask[None, :])


@triton.jit
def _pool_group_kernel(
    mass_ptr, seq_lens_ptr, out_ptr,
    stride_ms, stride_mh, stride_os, stride_oh,
    window, group, width,
    POOL: tl.constexpr, IS_MAX: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Step 3: ``out[s, h, j]`` = sum over the group of the pooled mass, ``-inf`` past
    ``T - window``. Tokens outside ``[0, T - window)`` pad as 0 (avg, counted in the
    divisor) or are ignored (max), as ``F.avg_pool1d``/``F.max_pool1d`` do."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    num_scored = tl.load(seq_lens_ptr + s) - window
    tok = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    offs_g = tl.arange(0, G_PAD)
    g_mask = offs_g < group
    rows = mass_ptr + s * stride_ms + (h * group + offs_g)[:, None] * stride_mh
    pad: tl.constexpr = float("-inf") if IS_MAX else 0.0
    pooled = tl.full([G_PAD, BLOCK], pad, tl.float32)
    for offset in tl.static_range(POOL):
        src = tok + (offset - POOL // 2)
        inside = (src >= 0) & (src < num_scored)
        vals = tl.load(rows + src[None, :], mask=g_mask[:, None] & inside[None, :], other=pad)
        if IS_MAX:
            pooled = tl.maximum(pooled, vals)
        else:
            pooled += vals
    if not IS_MAX:
        pooled = pooled / POOL
    score = tl.sum(tl.where(g_mask[:, None], pooled, 0.0), axis=0)
    score = tl.where(tok < num_scored, score, float("-inf"))
    tl.store(out_ptr + s * stride_os + h * stride_oh + tok, score, mask=tok < width)


def _compute_dtype(query: torch.Tensor, key_cache: torch.Tensor) -> torch.dtype:
    """The dot-product input dtype: the query's when keys convert to it exactly (same
    dtype, or fp8 keys), else fp32.

    Triton 3.6's CPU interpreter (the only way Triton runs on CPU tensors) multiplies bf16
    operands as their raw uint16 bits, so there bf16 goes through fp32, which is exact for
    bf16 values and changes nothing but the summation order.
    """
    if query.dtype == torch.bfloat16 and query.device.type == "cpu":
        return torch.float32
    if key_cache.dtype in (query.dtype, torch.float8_e4m3fn):
        return query.dtype
    return torch.float32


def _num_key_splits(num_tiles: int, num_programs: int, device: torch.device) -> int:
    """Key splits for step 1: enough programs to fill the GPU, never an empty tile range."""
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = _PROGRAMS_WITHOUT_GPU
    return max(1, min(num_tiles, triton.cdiv(target, max(num_programs, 1))))


def window_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
    pool_kernel: int = 7,
    pooling: Pooling = "avg",
    k_scale: float = 1.0,
) -> torch.Tensor:
    """Pooled, GQA-summed attention mass of the last ``window`` queries on each token.

    Args:
        query: ``[num_seqs, window, num_q_heads, head_dim]``, the last ``window`` prompt
            queries of each sequence, RoPE applied (rows of sequences with ``T < window``
            are ignored).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, any strides;
            fp16/bf16/fp32, or fp8 e4m3 dequantised with ``k_scale``.
        block_table: int32 ``[>= num_seqs, max_blocks_per_seq]``.
        seq_lens: int32 ``[num_seqs]``, the prompt length ``T`` of each sequence.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        window: observation window ``w``.
        pool_kernel: odd 1-D pooling kernel along tokens (stride 1, same padding).
        pooling: ``"avg"`` (padding counts as zeros) or ``"max"``.
        k_scale: per-tensor dequantisation scale of fp8 keys.

    Returns:
        fp32 ``[num_seqs, num_kv_heads, max(T) - w]``: token ``j < T_s - w`` of sequence
        ``s`` scores ``out[s, h, j]``; the rest is ``-inf``.
    """
    check_scoring_args(query, key_cache, block_table, seq_lens, window, pool_kernel, pooling)
    num_seqs, _, num_q_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    width = scored_width(seq_lens, window)
    out = torch.empty(num_seqs, num_kv_heads, width, dtype=torch.float32, device=query.device)
    if width == 0:
        return out

    query = query.to(_compute_dtype(query, key_cache))
    w_pad = triton.next_power_of_2(window)
    g_pad = max(triton.next_power_of_2(group), _MIN_DOT_ROWS // w_pad)
    rows = g_pad * w_pad
    d_pad = max(triton.next_power_of_2(head_dim), 16)
    qk_scale = scale * k_scale * math.log2(math.e)
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"
    seq_lens = seq_lens.to(torch.int32)
    common = dict(
        stride_qs=query.stride(0), stride_qw=query.stride(1),
        stride_qh=query.stride(2), stride_qd=query.stride(3),
        stride_kb=key_cache.stride(0), stride_ks=key_cache.stride(1),
        stride_kh=key_cache.stride(2), stride_kd=key_cache.stride(3),
        stride_bt=block_table.stride(0),
        window=window, group=group, head_dim=head_dim, qk_scale=qk_scale,
        PAGE_SIZE=key_cache.shape[1], W_PAD=w_pad, D_PAD=d_pad,
        BLOCK_N=_BLOCK_N, DOT_PRECISION=dot_precision, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )

    num_tiles = triton.cdiv(width + window, _BLOCK_N)
    splits = _num_key_splits(num_tiles, num_seqs * num_kv_heads, query.device)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    partial = torch.empty(num_seqs, num_kv_heads, splits, rows, dtype=torch.float32,
                          device=query.device)
    _lse_partial_kernel[(num_seqs, num_kv_heads, splits)](
        query, key_cache, block_table, seq_lens, partial,
        tiles_per_split=tiles_per_split, M=rows, **common,
    )
    lse = torch.empty(num_seqs, num_kv_heads, rows, dtype=torch.float32, device=query.device)
    _merge_lse_kernel[(num_seqs * num_kv_heads,)](
        partial, lse, splits, M=rows, SPLITS_PAD=triton.next_power_of_2(splits),
    )

    mass = torch.empty(num_seqs, num_q_heads, width, dtype=torch.float32, device=query.device)
    _window_mass_kernel[(num_seqs, num_kv_heads, triton.cdiv(width, _BLOCK_N))](
        query, key_cache, block_table, seq_lens, lse, mass,
        stride_ms=mass.stride(0), stride_mh=mass.stride(1), G_PAD=g_pad, **common,
    )
    _pool_group_kernel[(num_seqs, num_kv_heads, triton.cdiv(width, _BLOCK_POOL))](
        mass, seq_lens, out,
        mass.stride(0), mass.stride(1), out.stride(0), out.stride(1),
        window, group, width,
        POOL=pool_kernel, IS_MAX=pooling == "max", G_PAD=triton.next_power_of_2(group),
        BLOCK=_BLOCK_POOL,
    )
    return out
