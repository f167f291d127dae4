"""FastKV window scoring straight from vLLM's paged KV cache (Triton).

The score of token ``j`` is the softmax mass that the last ``window`` prompt queries put
on it, pooled along tokens per query head, then summed over each KV head's query group
(semantics: :func:`vllm_fastkv.kernels.reference.window_scores_ref`).

An exact score needs each window query's softmax normaliser (its log-sum-exp over all
the keys it sees) before any token's mass is known, and storing per-query probabilities
instead would cost ``window`` times the mass tensor. So the keys are read twice: pass 1
computes the log-sum-exps, pass 2 recomputes the logits and sums the normalised
probabilities. In the engine the prompt's own FlashAttention has just computed those
normalisers for the same queries and keys; given them (``lse``), pass 1 is skipped and
the keys are read once (:mod:`vllm_fastkv.attention_lse` captures them). No
``[heads, window, T]`` tensor ever exists. Every program holds a KV head's whole query
group (``group x window`` rows) against one key tile, so a key tile is read once per KV
head per pass, not once per query head.

Two implementations of the same function:

* Fused (``fused=FusedTuning()``): one persistent launch whose pass 2 re-reads keys from
  L2 instead of HBM. A *unit* is one (sequence, KV head); its tokens are cut into *items*
  of ``chunk`` tokens, and every item is a pass-1 job and a pass-2 job. Programs take jobs
  from an atomic ticket counter, pass-1 jobs ahead and pass-2 jobs ``lag`` items behind
  them, alternating, so a pass-2 job reads keys that pass 1 read about ``lag`` items
  earlier: with ``lag`` one unit plus a margin (32 MiB of keys plus a few MiB at 128K
  tokens with Llama-3.1-8B heads) they are still in H100's 50 MB L2. Pass-1 jobs store
  partial log-sum-exps; the last one of a unit to finish completes a two-level merge and
  raises the unit's ready flag, on which its pass-2 jobs spin. Every pass-1 ticket of a
  unit precedes all of its pass-2 tickets (``lag`` >= the longest unit) and pass-1 jobs
  never wait, so a waiting program only waits for jobs that running programs already hold:
  no deadlock, whatever the number of resident programs. Triton's CPU interpreter runs
  programs one after another; its first program then takes every ticket in order, so the
  same kernel runs (and is tested) there. Pass 2 pools and group-sums each tile in
  registers: a tile of ``BLOCK`` keys yields ``BLOCK - 2 * (pool_kernel // 2)`` scores,
  its edges being the pooling halo, so no mass tensor exists either.
* Two-pass (default, ``fused=None``): ``_lse_partial_kernel`` (pass 1 over key splits) and
  ``_merge_lse_kernel``, then ``_window_mass_kernel`` (pass 2: fp32 mass ``[num_seqs,
  heads, max(T) - window]``, per query head for max pooling, per KV head for avg) and
  ``_pool_group_kernel`` (pooling, then the group sum where it is still to do). Four
  launches; both passes read the keys from HBM (with ``lse`` given: the last two
  launches, one key pass). The default: on an H200 it is the faster of the two (0.18 vs
  0.33 ms at 128K tokens, Llama-3.1-8B heads; docs/BENCHMARKS.md): the fused kernel is
  bound by its per-job latency, not by HBM, so its L2 reuse does not pay.

Max pooling does not commute with the group sum, so both keep query heads apart until
pooled; avg pooling does commute (it is linear), so both sum the group first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_fastkv.kernels.reference import (
    Pooling,
    check_scoring_args,
    check_window_lse,
    scored_width,
)

# Key tokens per tile (with their warps and pipeline stages), and scored tokens per
# program of the two-pass pooling kernel. On an H100 at 128K tokens each two-pass key
# pass runs at ~85% of copy bandwidth with these; a sweep of 32/64/128 x 4/8 warps x 2-4
# stages found no clear winner.
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 3
_BLOCK_POOL = 256
# The two-pass mass kernel's key tile, programs per SM (each walks a contiguous range of
# tiles), pipeline stages and warps: its own constants, since with the normalisers given
# it is the only key pass. Fastest of 64/128 x 2/4/8 x 2-4 stages x 4/8 warps on an H200
# (Llama-3.1-8B heads, normalisers given, avg pooling, with the pooling launch):
# 0.0248 / 0.0800 ms at 32K / 128K tokens, 1.57x / 1.26x the read-once floor; 128 x 4 x 2
# came second (0.0257 / 0.0807), one 128-key tile per program before 0.026 / 0.086
# (docs/BENCHMARKS.md).
_MASS_BLOCK_N = 64
_MASS_PROGRAMS_PER_SM = 8
_MASS_NUM_STAGES = 2
_MASS_NUM_WARPS = 4
# At most this many tiles a program: in a ragged batch (one long prompt among many short
# ones, as when several prompts finish their prefill in one step) the per-unit split count
# aimed at the whole batch would otherwise leave the long prompt's keys to few programs,
# each walking a long range. A single 128K prompt (16 tiles a program) is not capped.
_MASS_MAX_TILES_PER_SPLIT = 16
# Two-pass step 1 aims for this many programs per SM (on a CPU, the interpreter: a fixed
# count).
_PROGRAMS_PER_SM = 4
_PROGRAMS_WITHOUT_GPU = 16
# tl.dot needs at least 16 rows.
_MIN_DOT_ROWS = 16
# Fused kernel: partial log-sum-exps merged per load, -inf entries written per store,
# sequences per step of its scans over the batch's lengths, and the widest pooling halo
# (per side) it takes; wider pooling runs the two-pass path.
_MERGE_BLOCK = 64
_FILL_BLOCK = 1024
_SEQ_BLOCK = 64
_MAX_FUSED_HALO = 16
# 32-bit registers per SM (Volta to Hopper), shared by the resident programs' threads,
# allocated per thread in multiples of 8.
_REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class FusedTuning:
    """Launch shape of the fused scoring kernel.

    Attributes:
        programs_per_sm: persistent programs per SM (under the CPU interpreter a fixed
            count, of which the first does all the work). Registers per thread are
            capped so that all of them fit an SM at once.
        tiles_per_item: pass-2 tiles per item; an item covers ``tiles_per_item *
            (BLOCK - 2 * (pool_kernel // 2))`` tokens in both passes. Smaller items
            leave less data in flight (between a key's two reads) but cost more
            per-item overhead (a ticket, the query load, the partial's merge).
        lag_per_program: pass 2 runs ``longest unit + lag_per_program * programs``
            items behind pass 1. The margin beyond one unit lets the unit's last pass-1
            jobs (claimed by other programs) and its merge finish before pass-2 jobs ask
            for it; a larger margin means fewer spins but a longer L2 reuse distance.
        num_warps: warps per program.
    """

    programs_per_sm: int = 4
    tiles_per_item: int = 2
    lag_per_program: float = 0.5
    num_warps: int = _NUM_WARPS


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
def _log_sum_exp_span(
    q, key_cache_ptr, block_table_row_ptr, h, start, end, last_key,
    stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask, qk_scale,
    M: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Pass 1 over keys ``[start, end)``: ``log2 sum 2^logit`` per query row over the keys
    row ``m`` sees (``<= last_key[m]``); about ``-1e30`` for a row that sees none."""
    # Keys past the span read as zeros: mask them like keys the row does not see.
    last_key = tl.minimum(last_key, end - 1)
    # A finite floor keeps 2^(logit - max) at 0, not NaN, while a row has seen no key.
    row_max = tl.full([M], -1e30, tl.float32)
    row_sum = tl.zeros([M], tl.float32)
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
    return row_max + tl.log2(tl.maximum(row_sum, 1.0))


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
    """Two-pass step 1: ``partial[s, h, split, m]`` = the split's log-sum-exp per row."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    q, _ = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
                                window, group, offs_m, offs_d, d_mask, W_PAD)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    # Window query i sits at position seq_len - window + i and sees keys up to it.
    lse = _log_sum_exp_span(q, key_cache_ptr, block_table_ptr + s.to(tl.int64) * stride_bt, h,
                            start, end, seq_len - window + offs_m % W_PAD,
                            stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask, qk_scale,
                            M, PAGE_SIZE, BLOCK_N, DOT_PRECISION)
    out = partial_ptr + ((s * tl.num_programs(1) + h) * tl.num_programs(2) + split) * M + offs_m
    tl.store(out, lse)


@triton.jit
def _merge_lse_kernel(
    partial_ptr, lse_ptr, num_splits, stride_ls, stride_lw, stride_lh, window, group,
    M: tl.constexpr, W_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """``lse[s, i, h * group + g]``: log2-sum-exp of ``partial[s, h, :, g * W_PAD + i]``
    over the key splits (the layout FlashAttention's log-sum-exps are given in)."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs_split = tl.arange(0, SPLITS_PAD)
    offs_m = tl.arange(0, M)
    row = s * tl.num_programs(1) + h
    ptrs = partial_ptr + (row * num_splits + offs_split[:, None]) * M + offs_m[None, :]
    part = tl.load(ptrs, mask=offs_split[:, None] < num_splits, other=float("-inf"))
    top = tl.max(part, axis=0)
    lse = top + tl.log2(tl.sum(tl.exp2(part - top[None, :]), axis=0))
    g = offs_m // W_PAD
    i = offs_m % W_PAD
    out = lse_ptr + s * stride_ls + i * stride_lw + (h * group + g) * stride_lh
    tl.store(out, lse, mask=(g < group) & (i < window))


@triton.jit
def _window_mass_kernel(
    query_ptr, key_cache_ptr, block_table_ptr, seq_lens_ptr, lse_ptr, mass_ptr,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_bt, stride_ls, stride_lw, stride_lh, stride_ms, stride_mh,
    window, group, head_dim, qk_scale, lse_to_log2, width, tiles_per_split,
    PAGE_SIZE: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SUM_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, LAUNCH_POOLING: tl.constexpr,
):
    """Two-pass step 2: ``mass[s, q, j] = sum_i softmax_row(q, i)[j]`` for the split's
    tokens ``j < T - window`` (and ``< width``); other entries are left untouched. With
    ``SUM_GROUP`` (avg pooling, which commutes with the group sum) the group's rows are
    summed first and ``mass[s, h, j]`` is per KV head: a quarter of the bytes at GQA 4.

    A program walks ``tiles_per_split`` key tiles in a loop (pipelined by Triton) and loads
    the query group and normalisers once: with one tile per program, programs spent a
    share of the time starting and waiting on their first loads (H200: 0.0255 against
    0.0248 ms at 32K tokens, 0.085 against 0.080 at 128K, with the pooling launch).

    ``lse[s, i, q] * lse_to_log2`` is row ``(q, i)``'s normaliser in log2 units.
    Before the window every window query sees every key, so no causal mask here.

    With ``LAUNCH_POOLING`` (Hopper and later) every program lets the pooling launch,
    made as a programmatic dependent launch, start at once: its programs take the SM
    slots this kernel's programs leave and wait there for its end, instead of being
    launched after it."""
    M: tl.constexpr = G_PAD * W_PAD
    if LAUNCH_POOLING:
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0)
    h = tl.program_id(1)
    num_scored = tl.minimum(tl.load(seq_lens_ptr + s) - window, width)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    first = tl.program_id(2) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(num_scored, BLOCK_N))
    # A program past its sequence's end (short prompts in a ragged batch) loads nothing.
    q, row_valid = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
                                        window, group, offs_m, offs_d, d_mask & (first < last),
                                        W_PAD)  # fmt: skip
    lse_ptrs = (lse_ptr + s * stride_ls + (offs_m % W_PAD) * stride_lw
                + (h * group + offs_m // W_PAD) * stride_lh)
    lse = tl.load(lse_ptrs, mask=row_valid & (first < last), other=0.0) * lse_to_log2
    block_table_row_ptr = block_table_ptr + s.to(tl.int64) * stride_bt
    for tile in tl.range(first, last, num_stages=NUM_STAGES):
        tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tok_mask = tok < num_scored
        logits = _key_tile_logits(q, key_cache_ptr, block_table_row_ptr, h, tok, tok_mask,
                                  stride_kb, stride_ks, stride_kh, stride_kd,
                                  offs_d, d_mask, qk_scale, PAGE_SIZE, DOT_PRECISION)
        # logit <= lse in exact arithmetic; the clamp only keeps rows that saw no key
        # (lse ~ -1e30, prompts shorter than the window) from overflowing.
        probs = tl.where(row_valid[:, None], tl.exp2(tl.minimum(logits - lse[:, None], 0.0)),
                         0.0)
        mass = tl.sum(tl.reshape(probs, [G_PAD, W_PAD, BLOCK_N]), axis=1)
        if SUM_GROUP:
            # Padded rows carry zero mass, so the plain column sum is the group sum.
            tl.store(mass_ptr + s * stride_ms + h * stride_mh + tok, tl.sum(mass, axis=0),
                     mask=tok_mask)  # fmt: skip
        else:
            offs_g = tl.arange(0, G_PAD)
            ptrs = (mass_ptr + s * stride_ms + (h * group + offs_g)[:, None] * stride_mh
                    + tok[None, :])  # fmt: skip
            tl.store(ptrs, mass, mask=(offs_g < group)[:, None] & tok_mask[None, :])


@triton.jit
def _pool_group_kernel(
    mass_ptr, seq_lens_ptr, out_ptr,
    stride_ms, stride_mh, stride_os, stride_oh,
    window, group, width,
    POOL: tl.constexpr, IS_MAX: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
    AFTER_MASS: tl.constexpr,
):
    """Two-pass step 3: ``out[s, h, j]`` = sum over the group of the pooled mass, ``-inf``
    past ``T - window``. Tokens outside ``[0, T - window)`` pad as 0 (avg, counted in the
    divisor) or are ignored (max), as ``F.avg_pool1d``/``F.max_pool1d`` do.

    With ``AFTER_MASS`` the launch may start while the mass kernel still runs
    (programmatic dependent launch): the mass is read only after ``gdc_wait``, which
    returns once that kernel has ended and its stores are visible."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    num_scored = tl.minimum(tl.load(seq_lens_ptr + s) - window, width)
    if AFTER_MASS:
        tl.extra.cuda.gdc_wait()
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


@triton.jit
def _pool_tile(
    mass, tok_valid, g_valid,
    POOL: tl.constexpr, POOL_PAD: tl.constexpr, IS_MAX: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pooled, group-summed score of each lane of a ``[G_PAD, BLOCK]`` mass tile whose
    lanes ``k +- POOL // 2`` all lie in the tile; invalid tokens pad as 0 (avg, in the
    divisor) or are ignored (max), as in the two-pass step 3.

    One ``tl.gather`` fetches every lane's ``POOL`` neighbours at once (as a
    ``POOL_PAD``-wide last axis): a gather may go through shared memory, and one gather
    per shift cost a round trip and two barriers each (seen in the sm_90 PTX)."""
    offset = tl.arange(0, POOL_PAD)
    src = tl.arange(0, BLOCK)[:, None] + (offset - POOL // 2)[None, :]
    src = tl.minimum(tl.maximum(src, 0), BLOCK - 1)
    in_pool = (offset < POOL)[None, :]
    if IS_MAX:
        vals = tl.where(g_valid[:, None] & tok_valid[None, :], mass, float("-inf"))
        near = tl.gather(tl.broadcast_to(vals[:, :, None], [G_PAD, BLOCK, POOL_PAD]),
                         tl.broadcast_to(src[None, :, :], [G_PAD, BLOCK, POOL_PAD]), 1)
        pooled = tl.max(tl.where(in_pool[None, :, :], near, float("-inf")), axis=2)
        score = tl.sum(tl.where(g_valid[:, None], pooled, 0.0), axis=0)
    else:
        # Padded query rows carry zero mass, so the plain column sum is the group sum.
        vals = tl.where(tok_valid, tl.sum(mass, axis=0), 0.0)
        near = tl.gather(tl.broadcast_to(vals[:, None], [BLOCK, POOL_PAD]), src, 0)
        score = tl.sum(tl.where(in_pool, near, 0.0), axis=1) / POOL
    return score


@triton.jit
def _items_per_seq(seq_lens_ptr, first, num_seqs, window, chunk, max_items,
                   SEQ_BLOCK: tl.constexpr):
    """Indices, lengths and items per KV head of sequences ``first .. first + SEQ_BLOCK - 1``
    (0 items past ``num_seqs``): a scored sequence of ``T`` tokens has ``cdiv(T, chunk)``
    (capped at ``max_items``), one that is not (``T <= window``) has one, which only
    writes its ``-inf`` row."""
    seq = first + tl.arange(0, SEQ_BLOCK)
    lens = tl.load(seq_lens_ptr + seq, mask=seq < num_seqs, other=0)
    items = tl.where(lens > window, tl.minimum(tl.cdiv(lens, chunk), max_items), 1)
    return seq, lens, tl.where(seq < num_seqs, items, 0)


@triton.jit
def _decode_item(item, seq_lens_ptr, num_seqs, num_kv_heads, window, chunk, max_items,
                 SEQ_BLOCK: tl.constexpr):
    """Sequence, KV head, chunk index, length and chunk count of a global item index
    (items run sequence-major, then KV head, then chunk). Sequences are scanned in blocks
    of ``SEQ_BLOCK``, so the batch size never changes the compiled kernel."""
    s = 0
    seq_len = 0
    n = 0
    seq_start = 0
    done = 0  # items of the sequences before the current block
    for first in range(0, num_seqs, SEQ_BLOCK):
        seq, lens, items = _items_per_seq(seq_lens_ptr, first, num_seqs, window, chunk,
                                          max_items, SEQ_BLOCK)
        ends = done + tl.cumsum(items, 0) * num_kv_heads
        starts = ends - items * num_kv_heads
        hit = (starts <= item) & (item < ends)  # exactly one sequence in the batch
        s += tl.sum(tl.where(hit, seq, 0), axis=0)
        seq_len += tl.sum(tl.where(hit, lens, 0), axis=0)
        n += tl.sum(tl.where(hit, items, 0), axis=0)
        seq_start += tl.sum(tl.where(hit, starts, 0), axis=0)
        done += tl.sum(items, axis=0) * num_kv_heads
    h = (item - seq_start) // n
    return s, h, item - seq_start - h * n, seq_len, n


@triton.jit
def _merge_log_sum_exps(ptr, count, stride, offs_m, M: tl.constexpr, BLOCK: tl.constexpr):
    """log2-sum-exp over the ``count >= 1`` rows ``ptr + r * stride`` of ``M`` values.

    Other programs wrote the rows: ``.cg`` reads them from L2, never from a stale L1 line."""
    top = tl.full([M], float("-inf"), tl.float32)
    total = tl.zeros([M], tl.float32)
    for block_start in range(0, count, BLOCK):
        idx = block_start + tl.arange(0, BLOCK)
        parts = tl.load(ptr + idx[:, None] * stride + offs_m[None, :], mask=(idx < count)[:, None],
                        other=float("-inf"), cache_modifier=".cg")
        new_top = tl.maximum(top, tl.max(parts, axis=0))
        total = total * tl.exp2(top - new_top) + tl.sum(tl.exp2(parts - new_top[None, :]), 0)
        top = new_top
    return top + tl.log2(total)


@triton.jit
def _fused_lse_job(
    query_ptr, key_cache_ptr, block_table_ptr, slot_ptr, unit_sync_ptr,
    s, h, c, seq_len, n,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_bt,
    window, group, head_dim, qk_scale, chunk,
    PAGE_SIZE: tl.constexpr, W_PAD: tl.constexpr, M: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MERGE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass-1 job: chunk ``c``'s partial log-sum-exps into row ``c`` of the unit's slot.

    Merging is a two-level tree, so no program reads more than ``MERGE_BLOCK`` rows at
    once: the last job of each group of ``MERGE_BLOCK`` chunks merges the group into the
    group's first row; the last group merges the group rows into row 0, the unit's
    log-sum-exps, and raises the ready flag (``unit_sync[0]``; ``[1]`` counts finished
    groups, ``[2 + g]`` finished jobs of group ``g``)."""
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < head_dim
    q, _ = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh, stride_qd,
                                window, group, offs_m, offs_d, d_mask, W_PAD)
    start = c * chunk
    part = _log_sum_exp_span(q, key_cache_ptr, block_table_ptr + s.to(tl.int64) * stride_bt, h,
                             start, tl.minimum(start + chunk, seq_len),
                             seq_len - window + offs_m % W_PAD,
                             stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask,
                             qk_scale, M, PAGE_SIZE, BLOCK_N, DOT_PRECISION)
    tl.store(slot_ptr + c * M + offs_m, part)
    # Every thread's stores land before the count goes up: the atomics are one thread's
    # (acq_rel), the barrier orders the others' stores before it.
    tl.debug_barrier()
    group_first = c // MERGE_BLOCK * MERGE_BLOCK
    group_count = tl.minimum(n - group_first, MERGE_BLOCK)
    group_ptr = slot_ptr + group_first * M
    if tl.atomic_add(unit_sync_ptr + 2 + c // MERGE_BLOCK, 1, sem="acq_rel") == group_count - 1:
        tl.store(group_ptr + offs_m,
                 _merge_log_sum_exps(group_ptr, group_count, M, offs_m, M, MERGE_BLOCK))
        tl.debug_barrier()
        groups = tl.cdiv(n, MERGE_BLOCK)
        if tl.atomic_add(unit_sync_ptr + 1, 1, sem="acq_rel") == groups - 1:
            tl.store(slot_ptr + offs_m,
                     _merge_log_sum_exps(slot_ptr, groups, MERGE_BLOCK * M, offs_m, M,
                                         MERGE_BLOCK))
            tl.debug_barrier()
            tl.atomic_xchg(unit_sync_ptr, 1, sem="release")


@triton.jit
def _fused_score_job(
    query_ptr, key_cache_ptr, block_table_ptr, slot_ptr, unit_sync_ptr, out_ptr,
    s, h, c, seq_len, n,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_bt, stride_os, stride_oh,
    window, group, head_dim, qk_scale, chunk, width,
    PAGE_SIZE: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK: tl.constexpr, POOL: tl.constexpr, POOL_PAD: tl.constexpr, IS_MAX: tl.constexpr,
    FILL_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass-2 job: final scores of chunk ``c``'s tokens (once the unit's log-sum-exps are
    ready in row 0 of its slot), then the chunk's share (one ``n``-th) of the row's
    ``-inf`` padding ``[T - window, width)``."""
    M: tl.constexpr = G_PAD * W_PAD
    HALO: tl.constexpr = POOL // 2
    out_row = out_ptr + s * stride_os + h * stride_oh
    num_scored = tl.minimum(seq_len - window, width)
    start = c * chunk
    stop = tl.minimum(start + chunk, num_scored)
    if start < stop:
        ready = tl.atomic_add(unit_sync_ptr, 0, sem="acquire")
        while ready == 0:
            ready = tl.atomic_add(unit_sync_ptr, 0, sem="acquire")
        offs_m = tl.arange(0, M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < head_dim
        q, row_valid = _load_window_queries(query_ptr, s, h, stride_qs, stride_qw, stride_qh,
                                            stride_qd, window, group, offs_m, offs_d, d_mask,
                                            W_PAD)
        lse = tl.load(slot_ptr + offs_m, cache_modifier=".cg")
        g_valid = tl.arange(0, G_PAD) < group
        lane = tl.arange(0, BLOCK)
        central = (lane >= HALO) & (lane < BLOCK - HALO)
        block_table_row_ptr = block_table_ptr + s.to(tl.int64) * stride_bt
        for out_start in range(start, stop, BLOCK - 2 * HALO):
            tok = out_start - HALO + lane
            tok_valid = (tok >= 0) & (tok < num_scored)
            logits = _key_tile_logits(q, key_cache_ptr, block_table_row_ptr, h, tok, tok_valid,
                                      stride_kb, stride_ks, stride_kh, stride_kd, offs_d, d_mask,
                                      qk_scale, PAGE_SIZE, DOT_PRECISION)
            # logit <= lse in exact arithmetic; the clamp only guards rounding.
            probs = tl.where(row_valid[:, None],
                             tl.exp2(tl.minimum(logits - lse[:, None], 0.0)), 0.0)
            mass = tl.sum(tl.reshape(probs, [G_PAD, W_PAD, BLOCK]), axis=1)
            score = _pool_tile(mass, tok_valid, g_valid, POOL, POOL_PAD, IS_MAX, G_PAD, BLOCK)
            tl.store(out_row + tok, score, mask=central & (tok < stop))
    pad_start = tl.maximum(num_scored, 0)
    share = tl.cdiv(tl.maximum(width - pad_start, 0), n)
    pad_lo = pad_start + c * share
    pad_hi = tl.minimum(pad_lo + share, width)
    for fill_start in range(pad_lo, pad_hi, FILL_BLOCK):
        tok = fill_start + tl.arange(0, FILL_BLOCK)
        tl.store(out_row + tok, tl.full([FILL_BLOCK], float("-inf"), tl.float32),
                 mask=tok < pad_hi)


# Arguments that change from batch to batch: specialising on their values (== 1, multiple
# of 16) would recompile the kernel in the middle of serving for no gain.
@triton.jit(do_not_specialize=[
    "stride_bt", "stride_os", "stride_oh", "num_seqs", "width", "max_items", "lag",
])
def _fused_scores_kernel(
    query_ptr, key_cache_ptr, block_table_ptr, seq_lens_ptr, partial_ptr, sync_ptr, out_ptr,
    stride_qs, stride_qw, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_bt, stride_os, stride_oh,
    num_seqs, num_kv_heads, window, group, head_dim, qk_scale, width, chunk, max_items, lag,
    PAGE_SIZE: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr, D_PAD: tl.constexpr,
    SEQ_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr, POOL: tl.constexpr,
    POOL_PAD: tl.constexpr, IS_MAX: tl.constexpr, MERGE_BLOCK: tl.constexpr,
    FILL_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Persistent scoring: take tickets until none is left (see the module docstring).

    Unit ``u`` owns rows ``[u * max_items, (u + 1) * max_items)`` of ``partial`` (its
    slot) and ``unit_sync = sync + 1 + u * (2 + cdiv(max_items, MERGE_BLOCK))``; ``sync``
    (int32) starts zeroed, ``sync[0]`` is the ticket counter. With ``N`` items, tickets
    ``< lag`` are pass-1 jobs ``0 .. lag - 1``; then pass-1 job ``lag + k`` and pass-2 job
    ``k`` alternate; once pass 1 is done the remaining pass-2 jobs follow. ``lag`` is at
    least the longest unit's item count, so a unit's pass-2 jobs come after all of its
    pass-1 jobs."""
    M: tl.constexpr = G_PAD * W_PAD
    num_items = 0
    for first in range(0, num_seqs, SEQ_BLOCK):
        _, _, items = _items_per_seq(seq_lens_ptr, first, num_seqs, window, chunk, max_items,
                                     SEQ_BLOCK)
        num_items += tl.sum(items, axis=0) * num_kv_heads
    lag = tl.minimum(lag, num_items)
    unit_sync_size = 2 + tl.cdiv(max_items, MERGE_BLOCK)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    while ticket < 2 * num_items:
        k = ticket - lag
        alternating = (ticket >= lag) & (ticket < 2 * num_items - lag)
        is_lse = (ticket < lag) | (alternating & (k % 2 == 0))
        item = tl.where(ticket < lag, ticket,
                        tl.where(alternating, tl.where(k % 2 == 0, lag + k // 2, k // 2),
                                 ticket - num_items))
        s, h, c, seq_len, n = _decode_item(item, seq_lens_ptr, num_seqs, num_kv_heads, window,
                                           chunk, max_items, SEQ_BLOCK)
        unit = s * num_kv_heads + h
        slot_ptr = partial_ptr + unit.to(tl.int64) * max_items * M
        unit_sync_ptr = sync_ptr + 1 + unit * unit_sync_size
        if is_lse:
            if seq_len > window:
                _fused_lse_job(
                    query_ptr, key_cache_ptr, block_table_ptr, slot_ptr, unit_sync_ptr,
                    s, h, c, seq_len, n,
                    stride_qs, stride_qw, stride_qh, stride_qd,
                    stride_kb, stride_ks, stride_kh, stride_kd, stride_bt,
                    window, group, head_dim, qk_scale, chunk,
                    PAGE_SIZE, W_PAD, M, D_PAD, BLOCK_N, MERGE_BLOCK, DOT_PRECISION,
                )
        else:
            _fused_score_job(
                query_ptr, key_cache_ptr, block_table_ptr, slot_ptr, unit_sync_ptr, out_ptr,
                s, h, c, seq_len, n,
                stride_qs, stride_qw, stride_qh, stride_qd,
                stride_kb, stride_ks, stride_kh, stride_kd, stride_bt, stride_os, stride_oh,
                window, group, head_dim, qk_scale, chunk, width,
                PAGE_SIZE, G_PAD, W_PAD, D_PAD, BLOCK, POOL, POOL_PAD, IS_MAX, FILL_BLOCK,
                DOT_PRECISION,
            )
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")


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


def _num_programs(per_sm: int, device: torch.device) -> int:
    """``per_sm`` programs per SM on a GPU; a fixed count under the CPU interpreter."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_WITHOUT_GPU


def _dependent_launches(device: torch.device) -> bool:
    """Whether the pooling launch may overlap the mass kernel's end (programmatic
    dependent launch, compute capability 9.0 and later; never under the interpreter)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _key_splits(
    num_tiles: int, units: int, per_sm: int, device: torch.device, max_tiles: int | None = None
) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` cutting each (sequence, KV head) unit's ``num_tiles``
    key tiles into contiguous ranges, so that all units together give about ``per_sm``
    programs per SM (one long sequence has only ``num_kv_heads`` units), no range is
    longer than ``max_tiles`` and no range of the longest unit is empty."""
    target = _num_programs(per_sm, device)
    splits = max(1, min(num_tiles, triton.cdiv(target, units)))
    if max_tiles is not None:
        splits = max(splits, triton.cdiv(num_tiles, max_tiles))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split


def _fused_tile(pool_kernel: int) -> int | None:
    """Pass-2 tile of the fused kernel: at least ``_BLOCK_N`` keys with the pooling halo at
    most a quarter of it; ``None`` if the halo is too wide for one tile in registers."""
    halo = pool_kernel // 2
    if halo > _MAX_FUSED_HALO:
        return None
    return max(_BLOCK_N, triton.next_power_of_2(8 * halo))


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
    max_seq_len: int | None = None,
    fused: FusedTuning | None = None,
    lse: torch.Tensor | None = None,
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
        max_seq_len: ``max(seq_lens)`` if the caller knows it on the host; ``None`` reads
            it from ``seq_lens`` (one device sync, the only one here). A smaller value
            than the true maximum gives undefined scores (never out-of-bounds writes).
        fused: launch shape of the fused single-launch kernel; ``None`` (the default)
            runs the two-pass kernels (same scores up to fp32 rounding). Pooling kernels
            wider than 33 always run two-pass (their halo would not fit one tile).
        lse: fp32 ``[num_seqs, window, num_q_heads]`` (any strides), each window query's
            natural-log log-sum-exp over the keys it sees, as the prompt's causal
            FlashAttention returns it (:func:`~vllm_fastkv.kernels.reference.window_lse_ref`
            computes the same). Given, the first pass is skipped and the keys are read
            once; ``fused`` must then be ``None``.

    Returns:
        fp32 ``[num_seqs, num_kv_heads, max(T) - w]``: token ``j < T_s - w`` of sequence
        ``s`` scores ``out[s, h, j]``; the rest is ``-inf``.
    """
    check_scoring_args(query, key_cache, block_table, seq_lens, window, pool_kernel, pooling)
    check_window_lse(lse, query)
    if lse is not None and fused is not None:
        raise ValueError("lse and fused exclude each other: the fused kernel computes its own")
    num_seqs, _, num_q_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if max_seq_len is None:
        width = scored_width(seq_lens, window)
    else:
        width = max(max_seq_len - window, 0) if num_seqs else 0
    out = torch.empty(num_seqs, num_kv_heads, width, dtype=torch.float32, device=query.device)
    if width == 0:
        return out

    query = query.to(_compute_dtype(query, key_cache))
    w_pad = triton.next_power_of_2(window)
    g_pad = max(triton.next_power_of_2(group), _MIN_DOT_ROWS // w_pad)
    qk_scale = scale * k_scale * math.log2(math.e)
    seq_lens = seq_lens.to(torch.int32)
    common = dict(
        stride_qs=query.stride(0), stride_qw=query.stride(1),
        stride_qh=query.stride(2), stride_qd=query.stride(3),
        stride_kb=key_cache.stride(0), stride_ks=key_cache.stride(1),
        stride_kh=key_cache.stride(2), stride_kd=key_cache.stride(3),
        stride_bt=block_table.stride(0),
        window=window, group=group, head_dim=head_dim, qk_scale=qk_scale,
        PAGE_SIZE=key_cache.shape[1], W_PAD=w_pad, D_PAD=max(triton.next_power_of_2(head_dim), 16),
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    tile = _fused_tile(pool_kernel)
    if fused is not None and tile is not None:
        _fused_scores(query, key_cache, block_table, seq_lens, out, common, fused, tile=tile,
                      g_pad=g_pad, pool_kernel=pool_kernel, pooling=pooling)
        return out
    _two_pass_scores(query, key_cache, block_table, seq_lens, out, common, g_pad=g_pad,
                     pool_kernel=pool_kernel, pooling=pooling, lse=lse)
    return out


def _fused_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    common: dict,
    tuning: FusedTuning,
    *,
    tile: int,
    g_pad: int,
    pool_kernel: int,
    pooling: Pooling,
) -> None:
    """Fill ``out`` with the fused kernel (see the module docstring)."""
    num_seqs, window = query.shape[:2]
    num_kv_heads = key_cache.shape[2]
    units = num_seqs * num_kv_heads
    chunk = tuning.tiles_per_item * (tile - 2 * (pool_kernel // 2))
    # Chunks of the longest sequence the output has room for: the slot rows per unit.
    max_items = triton.cdiv(out.shape[2] + window, chunk)
    programs = _num_programs(tuning.programs_per_sm, query.device)
    threads_per_sm = tuning.programs_per_sm * tuning.num_warps * 32
    registers = min(255, _REGISTERS_PER_SM // threads_per_sm // 8 * 8)
    partial = torch.empty(units * max_items, g_pad * common["W_PAD"], dtype=torch.float32,
                          device=query.device)
    sync = torch.zeros(1 + units * (2 + triton.cdiv(max_items, _MERGE_BLOCK)), dtype=torch.int32,
                       device=query.device)
    _fused_scores_kernel[(programs,)](
        query, key_cache, block_table, seq_lens, partial, sync, out,
        stride_os=out.stride(0), stride_oh=out.stride(1),
        num_seqs=num_seqs, num_kv_heads=num_kv_heads, width=out.shape[2], chunk=chunk,
        max_items=max_items, lag=max_items + math.ceil(tuning.lag_per_program * programs),
        G_PAD=g_pad, SEQ_BLOCK=_SEQ_BLOCK, BLOCK_N=_BLOCK_N, BLOCK=tile,
        POOL=pool_kernel, POOL_PAD=triton.next_power_of_2(pool_kernel), IS_MAX=pooling == "max",
        MERGE_BLOCK=_MERGE_BLOCK, FILL_BLOCK=_FILL_BLOCK,
        **(common | dict(num_warps=tuning.num_warps, maxnreg=registers)),
    )


def _two_pass_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    common: dict,
    *,
    g_pad: int,
    pool_kernel: int,
    pooling: Pooling,
    lse: torch.Tensor | None,
) -> None:
    """Fill ``out`` with the two-pass launches (see the module docstring); with ``lse``
    given, only the last two."""
    num_seqs, window, num_q_heads, _ = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    width = out.shape[2]
    if lse is None:
        lse, lse_to_log2 = _key_pass_lse(query, key_cache, block_table, seq_lens, common,
                                         g_pad=g_pad, width=width), 1.0  # fmt: skip
    else:
        lse_to_log2 = math.log2(math.e)
    # Max pooling does not commute with the group sum: its mass stays per query head.
    pooled_group = 1 if pooling == "avg" else group
    dependent = _dependent_launches(query.device)
    mass = torch.empty(num_seqs, num_kv_heads * pooled_group, width, dtype=torch.float32,
                       device=query.device)  # fmt: skip
    splits, tiles_per_split = _key_splits(triton.cdiv(width, _MASS_BLOCK_N),
                                          num_seqs * num_kv_heads, _MASS_PROGRAMS_PER_SM,
                                          query.device, _MASS_MAX_TILES_PER_SPLIT)  # fmt: skip
    _window_mass_kernel[(num_seqs, num_kv_heads, splits)](
        query, key_cache, block_table, seq_lens, lse, mass,
        stride_ls=lse.stride(0), stride_lw=lse.stride(1), stride_lh=lse.stride(2),
        stride_ms=mass.stride(0), stride_mh=mass.stride(1), lse_to_log2=lse_to_log2,
        width=width, tiles_per_split=tiles_per_split, G_PAD=g_pad, BLOCK_N=_MASS_BLOCK_N,
        SUM_GROUP=pooling == "avg", NUM_STAGES=_MASS_NUM_STAGES, LAUNCH_POOLING=dependent,
        **(common | dict(num_warps=_MASS_NUM_WARPS)),
    )  # fmt: skip
    _pool_group_kernel[(num_seqs, num_kv_heads, triton.cdiv(width, _BLOCK_POOL))](
        mass, seq_lens, out,
        mass.stride(0), mass.stride(1), out.stride(0), out.stride(1),
        window, pooled_group, width,
        POOL=pool_kernel, IS_MAX=pooling == "max", G_PAD=triton.next_power_of_2(pooled_group),
        BLOCK=_BLOCK_POOL, AFTER_MASS=dependent, **({"launch_pdl": True} if dependent else {}),
    )


def _key_pass_lse(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    common: dict,
    *,
    g_pad: int,
    width: int,
) -> torch.Tensor:
    """Pass 1: fp32 ``[num_seqs, window, num_q_heads]`` log2-sum-exps of the window rows."""
    num_seqs, window, num_q_heads, _ = query.shape
    num_kv_heads = key_cache.shape[2]
    rows = g_pad * common["W_PAD"]
    splits, tiles_per_split = _key_splits(triton.cdiv(width + window, _BLOCK_N),
                                          num_seqs * num_kv_heads, _PROGRAMS_PER_SM,
                                          query.device)  # fmt: skip
    partial = torch.empty(num_seqs, num_kv_heads, splits, rows, dtype=torch.float32,
                          device=query.device)
    _lse_partial_kernel[(num_seqs, num_kv_heads, splits)](
        query, key_cache, block_table, seq_lens, partial,
        tiles_per_split=tiles_per_split, M=rows, BLOCK_N=_BLOCK_N, **common,
    )
    lse = torch.empty(num_seqs, window, num_q_heads, dtype=torch.float32, device=query.device)
    _merge_lse_kernel[(num_seqs, num_kv_heads)](
        partial, lse, splits, lse.stride(0), lse.stride(1), lse.stride(2), window,
        num_q_heads // num_kv_heads, M=rows, W_PAD=common["W_PAD"],
        SPLITS_PAD=triton.next_power_of_2(splits),
    )
    return lse
