"""Decode attention over a cache whose oldest tokens are packed low-bit pages (Triton).

A request whose retained prompt KV was packed (:mod:`vllm_fastkv.kernels.quantization`)
sees, in its (retention-shifted) block table, ``n`` packed pages at columns ``0, R, 2R,
...`` holding its first ``n * R * block_size`` tokens, then ordinary full-precision
blocks. :func:`packed_decode_attention` computes such a row's decode attention in one
online-softmax pass over both parts: packed codes are dequantised in registers (a
full-precision copy never exists in memory), full-precision blocks are read as they
are. It reads a packed token's ``2 x head_dim x bits / 8`` bytes plus its share of the
scales instead of ``2 x head_dim x 2``. On GPUs the codes become the dots' 16-bit operands
two at a time (one inline-PTX block a pair, :func:`_code_pair`); the interpreter
dequantises in fp32. A row with ``n = 0`` is attended over its
full-precision blocks alone, so a batch of decode rows needs no other attention; rows
marked ``n = -1`` are skipped (left to vLLM's attention), so the grid depends only on the
batch size: CUDA graphs capture it once.

The serving path (:mod:`vllm_fastkv.kv_quantization`): in a batch of single-token decode
rows this kernel attends every row and vLLM's attention is not called; in a mixed batch
vLLM's attention runs first (with a packed row's length cut to one token, so it reads
almost nothing for it) and this kernel overwrites the packed rows' outputs.

A decode batch has few (row, KV head) pairs, fewer than a GPU's multiprocessors at batch
16 with 8 KV heads, and one program walking a 32K-token row's retained pages tile by tile
is bound by the latency of each step, not by bandwidth. So the work is split over the
sequence as in flash-decoding: ``splits`` programs per (row, KV head) take every
``splits``-th tile (packed block or full-precision block: strided, so the splits stay
balanced whatever the mix), each leaves its running max, normaliser and unnormalised
output in a scratch buffer, and the last of them to finish merges them all (an arrival
count per (row, KV head), as in split-K matrix products), so one launch does it all.

The same launch packs a decoding row's next page when the step's token completes it
(``pack_pages``): after attending, each program quantises its share of the page's blocks
into a scratch page, and the row's last program copies that over the page. So a decode
step has no packing launch of its own (two launches, every step, captured in the CUDA
graph whether a page was due or not, before this), and the next step attends over the
page packed, as if it had been packed before it.

Semantics: :func:`vllm_fastkv.kernels.reference.packed_decode_attention_ref`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from vllm_fastkv.kernels.quantization import (
    _copy_words,
    _pack_block_head,
    _stage_head_region,
    check_kernel_layout,
)
from vllm_fastkv.packed_layout import LowBitLayout, page_views

# tl.dot needs at least 16 rows; a KV head's query group is padded to this.
_MIN_DOT_ROWS = 16
#: Most blocks of a packed page per tile (fewer when a page has fewer). Whole-page tiles
#: (4 blocks at 2 bits for Llama-3.1-8B heads) take 4x fewer iterations: 130.8 us a layer
#: against 162.6 us for 1-block tiles on an H200 (docs/BENCHMARKS.md,
#: ``bench_packed_decode.py``), and the fewest cycles under Nsight Compute since.
DEFAULT_TILE_BLOCKS = 4
#: Warps of a program and software-pipeline stages of the tile loop. Timed sweeps on H200s
#: vary up to 3x between machines and runs (docs/BENCHMARKS.md), so these come from
#: Nsight Compute's cycle counts of single launches (clock-independent): 4 warps and one
#: stage at both widths (2-bit whole pages at 8 splits: 117K cycles, the best cell
#: measured; 2 warps, 136K at 5 splits against 143K at 4 warps, were not measured at 8;
#: 4-bit 2-block tiles: 157K against 173K at 2 warps); 8 warps and 3 stages were slower
#: in every timed sweep, and 2 stages with the 16-bit pairs (docs/BENCHMARKS.md, "eighth
#: run").
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 1
#: Registers a thread of the decode kernel may use, whatever the warp count: sized for the
#: default 4 warps, four programs an SM (sm_90, 64K registers). With the split merge inside
#: the kernel ptxas otherwise takes 167 at 2 bits (three programs an SM) where 128 fit
#: without spilling (8-warp programs took 79-112 before the merge moved in). With the
#: 16-bit pairs a cap of 96 (five programs an SM) was slower at every tile size.
MAX_REGISTERS = 128
#: Most splits :func:`splits_for` chooses; the merge is compiled for this many (more when
#: asked for explicitly), so every batch size shares one variant.
MAX_SPLITS = 16
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: int32 words the program that finishes a page packed after attention copies at a time
#: (16 KiB, 32 registers a thread at 4 warps): a 2-bit Llama-3.1-8B page is 14,336 words,
#: four round trips through L2 instead of fourteen at the packing launch's 1,024.
PAGE_COPY_WORDS = 4096


@triton.jit
def _attend(q, k_t, v, m_i, l_i, acc, valid, DOT_PRECISION: tl.constexpr):
    """Online-softmax step over one tile: logits ``q @ k_t`` (base-2, scale folded into
    ``q``), keys where ``valid`` is false are masked.

    ``l_i`` is either the row sums ``[G_PAD]`` or, as a ``[G_PAD, tile]`` tensor, the
    row sums kept per column (rescaled like the rest, summed by the caller after the
    loop): the loop then skips a cross-warp sum, its shared-memory round trip and its
    barriers, every tile."""
    logits = tl.dot(q, k_t, input_precision=DOT_PRECISION)
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    p = tl.exp2(logits - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    if len(l_i.shape) == 2:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _pair_asm(bits: int, dtype: str, magic: int) -> tl.constexpr:
    """PTX turning the low code of each 16-bit half of a shifted word into a 16-bit float
    pair, scaled: ``(w & mask) | magic`` is the float ``magic_value + code`` in each half
    (``magic`` has a unit last mantissa bit), minus ``magic_value`` is the code exactly,
    then one fused multiply-add per pair with the word's scale and minimum (packed)."""
    mask = (1 << bits) - 1
    return tl.constexpr(
        "{ .reg .b32 t, c; "
        f"lop3.b32 t, $1, {mask | mask << 16}, {magic | magic << 16}, 0xea; "
        f"mov.b32 c, {magic | magic << 16}; "
        f"sub.rn.{dtype}x2 t, t, c; "
        f"fma.rn.{dtype}x2 $0, t, $3, $4; }}"
    )


# 0x4300 is bf16 128.0 and 0x6400 fp16 1024.0: numbers whose last mantissa bit is 1. One
# block per width and dtype because the mask must sit inside the PTX: masked in Triton
# before it, ptxas does not merge the AND with the block's OR (sm_90 SASS of the 2-bit
# whole-page loop: 881 instructions a thread and tile against 817).
_PAIR_BF16_2 = _pair_asm(2, "bf16", 0x4300)
_PAIR_BF16_4 = _pair_asm(4, "bf16", 0x4300)
_PAIR_FP16_2 = _pair_asm(2, "f16", 0x6400)
_PAIR_FP16_4 = _pair_asm(4, "f16", 0x6400)


@triton.jit
def _dequantize(words, scale, minimum, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Values of int32 words ``[A, W]`` of codes: ``[A, W * (32 / BITS)]`` in word
    order, each code times its word's ``scale`` plus its ``minimum`` (``[A, W]``), in
    ``DOT_DTYPE`` (16-bit floats on GPUs, fp32 under the interpreter).

    All codes of a word share one scale (a key word's tokens lie in one block, a value
    word's channels in one group), so each code is dequantised in the words' own layout
    and the codes of a word are joined along a new axis held by the same thread: no
    broadcast of scales and no word replicated across threads.
    """
    values = _word_codes(words, scale, minimum, BITS, DOT_DTYPE)
    return tl.reshape(values, [words.shape[0], words.shape[1] * values.shape[2]])


@triton.jit
def _dequantize_rows(words, scale, minimum, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """:func:`_dequantize` with each word's codes along the first axis: words ``[A, W]``
    give ``[A * (32 / BITS), W]``, row ``a * (32 / BITS) + i`` holding code ``i`` of the
    words of row ``a``."""
    values = tl.permute(_word_codes(words, scale, minimum, BITS, DOT_DTYPE), (0, 2, 1))
    return tl.reshape(values, [words.shape[0] * values.shape[1], words.shape[1]])


@triton.jit
def _word_codes(words, scale, minimum, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The dequantised codes of int32 words ``[A, W]``: ``[A, W, 32 / BITS]``."""
    PER_WORD: tl.constexpr = 32 // BITS
    bits = words.to(tl.uint32, bitcast=True)
    values = _dequantized_codes(bits, scale.to(DOT_DTYPE), minimum.to(DOT_DTYPE), 0, 1,
                                PER_WORD, BITS, DOT_DTYPE)
    return tl.reshape(values, [words.shape[0], words.shape[1], PER_WORD])


@triton.jit
def _dequantized_codes(bits, scale, minimum, first: tl.constexpr, stride: tl.constexpr,
                       count: tl.constexpr, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Codes ``first, first + stride, ...`` (``count`` of them) of every word, dequantised
    in ``DOT_DTYPE``, on trailing axes that flatten in that order: the even-indexed half
    joined with the odd-indexed half, recursively. In fp32 the recursion ends at single
    codes; in 16-bit floats at pairs ``(first, first + stride)``, whose codes lie 16 bits
    apart (``stride * BITS == 16``), dequantised by one instruction each step
    (:func:`_code_pair`)."""
    LAST: tl.constexpr = 1 if DOT_DTYPE == tl.float32 else 2
    if count == LAST:
        if LAST == 1:
            code = (bits >> (first * BITS)) & ((1 << BITS) - 1)
            return code.to(tl.float32) * scale + minimum
        else:
            return _code_pair(bits >> (first * BITS), scale, minimum, BITS, DOT_DTYPE)
    else:
        even = _dequantized_codes(bits, scale, minimum, first, 2 * stride, count // 2, BITS,
                                  DOT_DTYPE)
        odd = _dequantized_codes(bits, scale, minimum, first + stride, 2 * stride,
                                 count // 2, BITS, DOT_DTYPE)
        return tl.join(even, odd)


@triton.jit
def _code_pair(shifted, scale, minimum, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The codes in the low bits of each 16-bit half of ``shifted`` as a scaled 16-bit
    float pair ``[..., 2]`` (low half first): one inline-PTX block (:func:`_pair_asm`),
    about 2 instructions a code against 4.5 for shift, mask, convert, fp32 multiply-add
    and packing one by one."""
    if DOT_DTYPE == tl.bfloat16:
        if BITS == 2:
            asm: tl.constexpr = _PAIR_BF16_2
        else:
            asm: tl.constexpr = _PAIR_BF16_4
    else:
        if BITS == 2:
            asm: tl.constexpr = _PAIR_FP16_2
        else:
            asm: tl.constexpr = _PAIR_FP16_4
    return tl.inline_asm_elementwise(
        asm, "=r,r,r,r,r", [tl.join(shifted, shifted), tl.join(scale, scale),
                            tl.join(minimum, minimum)],
        dtype=scale.dtype, is_pure=True, pack=2,
    )  # fmt: skip


@triton.jit
def _attended_row(packed_ptr, qsl_ptr, row):
    """Row ``row``'s query token, and whether the decode kernel attends it: rows marked -1
    are left to vLLM's attention, rows without a query are batch padding."""
    token = tl.load(qsl_ptr + row).to(tl.int64)
    return token, (tl.load(packed_ptr + row) >= 0) & (tl.load(qsl_ptr + row + 1) > token)


# The split count follows the batch size (decode_splits): as a compile-time constant, or
# specialised on (== 1, multiple of 16), every new batch size of an eager step (mixed
# prefill and decode batches) would compile both kernels again in the middle of serving.
@triton.jit(do_not_specialize=["splits"])
def _packed_decode_kernel(
    query_ptr, key_ptr, value_ptr, words_ptr, halves_ptr, block_table_ptr, qsl_ptr,
    seq_lens_ptr, packed_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, arrivals_ptr, out_ptr,
    pack_ptr, stage_ptr, stage_halves_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, page_words, group, num_q_heads, qk_scale, splits,
    BITS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, VGROUP: tl.constexpr,
    NUM_HEADS: tl.constexpr, R: tl.constexpr, HEAD_WORDS: tl.constexpr,
    VALUE_CODES: tl.constexpr, KEY_SCALE: tl.constexpr, KEY_MIN: tl.constexpr,
    VALUE_SCALE: tl.constexpr, VALUE_MIN: tl.constexpr, G_PAD: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, TILES_PER_PAGE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MERGE_G_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, USED_WORDS: tl.constexpr,
    COPY_BLOCK: tl.constexpr,
):
    """Program (row, KV head, split): that split's tiles of the row for the KV head's query
    heads; writes the partial max / sum / output of each query head, and the last split of
    the (row, KV head) to finish merges them all into ``out``. Then, if the row packs a
    page after attending (``pack[row] >= 0``), the split's share of that page's blocks for
    the KV head, into the row's scratch page; the row's last program to finish copies it
    over the page's first block (:func:`_pack_after_attention`).

    Merging here rather than in a second launch saves that launch and its wait for this
    one's last program (5.1 us a layer on an H200 at batch 16, docs/BENCHMARKS.md, against
    66 us for this kernel). ``arrivals`` (int32 per (row, KV head)) counts the finished
    splits; it is zero on entry and the merging program leaves it zero again, so the
    buffer is reused from layer to layer without a memset."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_pages = tl.load(packed_ptr + row)
    token, attended = _attended_row(packed_ptr, qsl_ptr, row)
    if attended:
        PER_WORD: tl.constexpr = 32 // BITS
        KEY_WORDS: tl.constexpr = BLOCK // PER_WORD
        VALUE_WORDS: tl.constexpr = DIM // PER_WORD
        NG: tl.constexpr = DIM // VGROUP
        seq_len = tl.load(seq_lens_ptr + row)
        m = tl.arange(0, G_PAD)
        dim = tl.arange(0, DIM)
        tok = tl.arange(0, BLOCK)
        heads = h * group + m
        q_mask = (m < group)[:, None]
        q = tl.load(query_ptr + token * stride_qt + heads[:, None] * stride_qh
                    + dim[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
        q = (q * qk_scale).to(DOT_DTYPE)
        row_ptr = block_table_ptr + row.to(tl.int64) * stride_bt
        m_i = tl.full([G_PAD], -1e30, tl.float32)
        acc = tl.zeros([G_PAD, DIM], tl.float32)
        # Packed tiles: TILE_BLOCKS consecutive blocks of one page (blocks past R masked),
        # TILES_PER_PAGE of them per page; one tile is [DIM, TILE_BLOCKS * BLOCK] keys.
        TILE: tl.constexpr = TILE_BLOCKS * BLOCK
        # Row sums kept per column in this loop (see _attend): on an H200, 3-5% faster
        # than one cross-warp sum a tile (docs/BENCHMARKS.md, ninth run).
        l_cols = tl.zeros([G_PAD, TILE], tl.float32)
        BLOCK_WORDS: tl.constexpr = NUM_HEADS * HEAD_WORDS
        TILE_KEY_WORDS: tl.constexpr = TILE_BLOCKS * KEY_WORDS
        col = tl.arange(0, TILE_KEY_WORDS)
        col_block = col // KEY_WORDS
        rows = tl.arange(0, TILE)
        row_block = rows // BLOCK
        row_tok = rows % BLOCK
        vword = tl.arange(0, VALUE_WORDS)
        # The next tile's page number is loaded while this tile is attended, so a tile's
        # code loads wait on one load, not two in a row (H200, 2-bit, 32 layers in a CUDA
        # graph: 61.0 against 62.2 us a layer, docs/BENCHMARKS.md, eleventh run).
        num_tiles = num_pages * TILES_PER_PAGE
        next_page = tl.load(row_ptr + (split // TILES_PER_PAGE) * R,
                            mask=split < num_tiles, other=0).to(tl.int64)
        for tile in range(split, num_tiles, splits):
            page = next_page
            following = tile + splits
            next_page = tl.load(row_ptr + (following // TILES_PER_PAGE) * R,
                                mask=following < num_tiles, other=0).to(tl.int64)
            first_block = (tile % TILES_PER_PAGE) * TILE_BLOCKS
            head_base = page * page_words + h * HEAD_WORDS
            # Token i of the tile is token i % BLOCK of the tile's block i // BLOCK.
            row_valid = first_block + row_block < R
            block_base = head_base + (first_block + row_block) * BLOCK_WORDS  # [TILE]
            # Keys, transposed [DIM, TILE]: word c of a channel row is word c % KEY_WORDS
            # of block c // KEY_WORDS, whose scale and minimum (per block and channel) it
            # is loaded with.
            word_block = first_block + col_block  # [TILE_KEY_WORDS]
            word_valid = (word_block < R)[None, :]
            k_words = tl.load(words_ptr + head_base + word_block[None, :] * BLOCK_WORDS
                              + dim[:, None] * KEY_WORDS + (col % KEY_WORDS)[None, :],
                              mask=word_valid, other=0)
            k_halves = (halves_ptr + 2 * (head_base + word_block * BLOCK_WORDS)[None, :]
                        + dim[:, None])
            k_scale = tl.load(k_halves + KEY_SCALE, mask=word_valid, other=0.0).to(tl.float32)
            k_min = tl.load(k_halves + KEY_MIN, mask=word_valid, other=0.0).to(tl.float32)
            k_t = _dequantize(k_words, k_scale, k_min, BITS, DOT_DTYPE)
            # Values [TILE, DIM]: word w of a token holds channels of group
            # w * PER_WORD // VGROUP. Dequantised as [DIM, TILE] and transposed, which
            # leaves each thread consecutive channels of a token as the dot's shared-memory
            # operand is laid out: stored 16 bytes at a time, not element by element (sm_90,
            # 2 bits, whole pages: 8 STS.128 for 64 STS.U16 a thread and tile, 5% fewer
            # instructions, 2 fewer barriers).
            v_words = tl.load(words_ptr + block_base[None, :] + VALUE_CODES
                              + row_tok[None, :] * VALUE_WORDS + vword[:, None],
                              mask=row_valid[None, :], other=0)
            grp = (2 * block_base[None, :] + row_tok[None, :] * NG
                   + (vword * PER_WORD // VGROUP)[:, None])
            v_scale = tl.load(halves_ptr + grp + VALUE_SCALE, mask=row_valid[None, :],
                              other=0.0).to(tl.float32)
            v_min = tl.load(halves_ptr + grp + VALUE_MIN, mask=row_valid[None, :],
                            other=0.0).to(tl.float32)
            v = tl.trans(_dequantize_rows(v_words, v_scale, v_min, BITS, DOT_DTYPE))
            m_i, l_cols, acc = _attend(q, k_t, v, m_i, l_cols, acc, row_valid, DOT_PRECISION)
        l_i = tl.sum(l_cols, axis=1)
        # Full-precision blocks after the packed pages, the same split's share of them,
        # a block a step: wider gathered tiles cost registers (255 for 4-block tiles,
        # 168 for 2, on sm_90) that every packed tile would pay for in occupancy.
        # The block after the last packed tile goes to the split after that tile's, so
        # the splits' shares of tiles and blocks together differ by at most one.
        first_split = (num_pages * TILES_PER_PAGE) % splits
        first = num_pages * R * BLOCK + ((split - first_split + splits) % splits) * BLOCK
        for start in range(first, seq_len, splits * BLOCK):
            block = tl.load(row_ptr + start // BLOCK).to(tl.int64)
            valid = start + tok < seq_len
            k_t = tl.load(key_ptr + block * stride_kb + tok[None, :] * stride_ks
                          + h * stride_kh + dim[:, None] * stride_kd,
                          mask=valid[None, :], other=0.0)
            v = tl.load(value_ptr + block * stride_vb + tok[:, None] * stride_vs
                        + h * stride_vh + dim[None, :] * stride_vd,
                        mask=valid[:, None], other=0.0)
            m_i, l_i, acc = _attend(q, k_t.to(DOT_DTYPE), v.to(DOT_DTYPE), m_i, l_i, acc,
                                    valid, DOT_PRECISION)
        # Scratch [rows, num_q_heads, splits] (+ [DIM]); a split without tiles leaves
        # max -1e30, sum 0, output 0, which the merge weighs by 0.
        part = (row.to(tl.int64) * num_q_heads + heads) * splits + split
        tl.store(part_max_ptr + part, m_i, mask=m < group)
        tl.store(part_sum_ptr + part, l_i, mask=m < group)
        tl.store(part_acc_ptr + part[:, None] * DIM + dim[None, :], acc, mask=q_mask)
        # Every thread's partials are stored before the count goes up (the atomic is one
        # thread's, its result broadcast to the others); the last split reads the others'
        # partials from L2 (``.cg``: never a stale L1 line of an earlier layer's).
        tl.debug_barrier()
        arrivals = arrivals_ptr + row * NUM_HEADS + h
        if tl.atomic_add(arrivals, 1, sem="acq_rel") == splits - 1:
            tl.store(arrivals, 0)
            _merge_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, token, h,
                          row.to(tl.int64), stride_ot, stride_oh, stride_od, group,
                          num_q_heads, splits, DIM, MERGE_G_PAD, SPLITS_PAD)
    pack_page = tl.load(pack_ptr + row)
    if pack_page >= 0:
        _pack_after_attention(
            key_ptr, value_ptr, words_ptr, block_table_ptr, arrivals_ptr, stage_ptr,
            stage_halves_ptr, row, h, split, splits, pack_page,
            stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd, stride_bt, page_words,
            BITS, BLOCK, DIM, VGROUP, NUM_HEADS, R, HEAD_WORDS, VALUE_CODES, KEY_SCALE,
            KEY_MIN, VALUE_SCALE, VALUE_MIN, USED_WORDS, COPY_BLOCK,
        )  # fmt: skip


@triton.jit
def _pack_after_attention(
    key_ptr, value_ptr, words_ptr, block_table_ptr, arrivals_ptr, stage_ptr, stage_halves_ptr,
    row, h, split, splits, pack_page,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_bt, page_words,
    BITS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, VGROUP: tl.constexpr,
    NUM_HEADS: tl.constexpr, R: tl.constexpr, HEAD_WORDS: tl.constexpr,
    VALUE_CODES: tl.constexpr, KEY_SCALE: tl.constexpr, KEY_MIN: tl.constexpr,
    VALUE_SCALE: tl.constexpr, VALUE_MIN: tl.constexpr, USED_WORDS: tl.constexpr,
    COPY_BLOCK: tl.constexpr,
):
    """Pack page ``pack_page`` of ``row`` (the ``R`` blocks from column ``pack_page * R``
    of its block table) into the first of them, as :func:`~vllm_fastkv.kernels.pack_kv`
    does in two launches: this program quantises blocks ``split, split + splits, ...`` of
    KV head ``h`` into the row's scratch page; the last of the row's
    ``NUM_HEADS x splits`` programs to get here copies the scratch page over the page.

    Every program of the row has finished reading the cache when it arrives (its
    attention's results are stored, its blocks quantised), and only this row's programs
    read these blocks, so the page is written after its last read: a decode step packs
    its pages without a launch of its own. The arrival count (int32, after the
    per-(row, KV head) counts) is zero on entry and left zero.
    """
    row_ptr = block_table_ptr + row.to(tl.int64) * stride_bt + pack_page * R
    for r in range(split, R, splits):
        block = tl.load(row_ptr + r).to(tl.int64)
        words_out, halves_out = _stage_head_region(stage_ptr, stage_halves_ptr, row, r, h,
                                                   page_words, NUM_HEADS, HEAD_WORDS)
        _pack_block_head(key_ptr, value_ptr, block, h, words_out, halves_out,
                         stride_kb, stride_ks, stride_kh, stride_kd,
                         stride_vb, stride_vs, stride_vh, stride_vd,
                         BITS, BLOCK, DIM, VGROUP, VALUE_CODES, KEY_SCALE, KEY_MIN,
                         VALUE_SCALE, VALUE_MIN)  # fmt: skip
    # As in the split merge: every thread's stores, then one thread's count.
    tl.debug_barrier()
    count = arrivals_ptr + tl.num_programs(0) * NUM_HEADS + row
    if tl.atomic_add(count, 1, sem="acq_rel") == NUM_HEADS * splits - 1:
        tl.store(count, 0)
        page = tl.load(row_ptr).to(tl.int64)
        stage = stage_ptr + row.to(tl.int64) * page_words
        for start in range(0, USED_WORDS, COPY_BLOCK):
            _copy_words(words_ptr + page * page_words, stage, start, USED_WORDS, COPY_BLOCK)


@triton.jit
def _merge_splits(
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, token, h, row, stride_ot, stride_oh,
    stride_od, group, num_q_heads, splits,
    DIM: tl.constexpr, G_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Softmax-merge the splits' partial outputs of KV head ``h``'s query heads of ``row``
    into ``out`` (``G_PAD`` >= the group, a power of two: no dot here, so no padding to
    16 rows).

    The splits' maxima are loaded at once (``SPLITS_PAD`` >= ``splits``, masked), then the
    partials in chunks of ``16 / G_PAD`` splits: a loop over single splits waits on each
    split's loads in turn, while all splits at once would hold ``G_PAD x splits x DIM``
    values a program."""
    CHUNK: tl.constexpr = 16 // G_PAD if G_PAD < 16 else 1
    m = tl.arange(0, G_PAD)
    dim = tl.arange(0, DIM)
    heads = h * group + m
    head_mask = m < group
    base = (row * num_q_heads + heads) * splits
    s = tl.arange(0, SPLITS_PAD)
    m_all = tl.max(tl.load(part_max_ptr + base[:, None] + s[None, :],
                           mask=head_mask[:, None] & (s < splits)[None, :], other=-1e30,
                           cache_modifier=".cg"), axis=1)  # fmt: skip
    l_all = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DIM], tl.float32)
    for first in range(0, splits, CHUNK):
        chunk = first + tl.arange(0, CHUNK)
        valid = head_mask[:, None] & (chunk < splits)[None, :]
        part = base[:, None] + chunk[None, :]
        weight = tl.exp2(tl.load(part_max_ptr + part, mask=valid, other=-1e30,
                                 cache_modifier=".cg") - m_all[:, None])
        l_all += tl.sum(weight * tl.load(part_sum_ptr + part, mask=valid, other=0.0,
                                         cache_modifier=".cg"), 1)
        acc += tl.sum(weight[:, :, None] * tl.load(
            part_acc_ptr + part[:, :, None] * DIM + dim[None, None, :],
            mask=valid[:, :, None], other=0.0, cache_modifier=".cg",
        ), 1)  # fmt: skip
    # No key at all (a padding row of a captured batch): zeros.
    out = acc / tl.where(head_mask & (l_all > 0), l_all, 1.0)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh
             + dim[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=head_mask[:, None])


def decode_splits(rows: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per (row, KV head) on ``device`` (:func:`splits_for`).

    Depends on the batch size only, so a CUDA graph captured for a batch size keeps it;
    the kernels take it at run time, so every batch size shares one compiled variant.
    """
    if device.type != "cuda":
        return 2  # the interpreter: exercise the split and merge, cheaply
    return splits_for(rows, num_kv_heads, _sm_count(device.index))


def splits_for(rows: int, num_kv_heads: int, multiprocessors: int) -> int:
    """About 4 programs per multiprocessor (one wave: 4 fit, at 128 registers a thread),
    1 to ``MAX_SPLITS`` splits.

    On H200s (132 multiprocessors), 8 KV heads, timed where it runs, in CUDA graphs
    between the model's GEMMs (docs/BENCHMARKS.md, eleventh run): at batch 16, 4 splits
    58.4-59.9 us a layer against 60.7-62.2 at 8 and 77.2 at 6 on three machines; at batch
    8 / 32 / 64 (8 / 2 / 1 splits) 32.5 / 110.7 / 215.4 us against 35.1 / 112.6 / 216.8
    with twice the splits. 8 splits had the fewest cycles under Nsight Compute of the
    kernel alone at batch 16 (117K-120K against 143K-146K at 5), which timing it in place
    does not bear out. (On three machines the gate/up GEMM after the 8-split kernel also
    ran 2.6-2.9 us slower than after a 16-bit attention and as fast at 4 splits; on a
    fourth, faster at 8.)
    """
    return max(1, min(MAX_SPLITS, 4 * multiprocessors // (rows * num_kv_heads)))


@functools.cache
def _sm_count(index: int | None) -> int:
    """Multiprocessors of a GPU (asked once: every layer of every eager step calls)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def packed_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    packed_pages: torch.Tensor,
    output: torch.Tensor,
    *,
    scale: float,
    layout: LowBitLayout,
    splits: int | None = None,
    tile_blocks: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_registers: int | None = None,
    arrivals: torch.Tensor | None = None,
    pack_pages: torch.Tensor | None = None,
    stage: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of the rows this kernel attends, written into ``output``; then
    the pages ``pack_pages`` asks for packed, in the same launch.

    Args:
        query, output: ``[num_tokens, num_q_heads, head_dim]``; row ``i``'s query is token
            ``query_start_loc[i]`` (one query per attended row; a row without a query, as
            batch padding has, is skipped).
        key_cache, value_cache: the layer's views ``[num_blocks, block_size, heads, dim]``.
        block_table: int32 ``[>= rows, max_blocks]``, as the row attends (shifted past
            any freed leading blocks).
        query_start_loc: int32 ``[>= rows + 1]``.
        seq_lens: int32 ``[rows]`` tokens each row attends to.
        packed_pages: int32 ``[rows]`` packed pages ``n`` at the front of each row (0: the
            row has only full-precision blocks; -1: the row is left untouched).
        scale: softmax scale.
        layout: the packed layout of the cache's pages.
        splits: programs per (row, KV head); default :func:`decode_splits`.
        tile_blocks: blocks of a packed page dequantised and attended as one tile (a
            power of two; blocks past a page's end are masked; default the page's
            blocks rounded up to a power of two, at most ``DEFAULT_TILE_BLOCKS``).
            Fewer mean more iterations of less work each.
        num_warps: warps of a program (default ``DEFAULT_NUM_WARPS``).
        num_stages: pipeline stages of the tile loop (default ``DEFAULT_NUM_STAGES``).
        max_registers: registers a thread may use (default ``MAX_REGISTERS``); fewer let
            more programs share a multiprocessor, at the price of spills.
        arrivals: int32 ``[>= rows * (num_kv_heads + 1)]``, all zero, and left all zero:
            the splits' arrival counts per (row, KV head), then the rows' for packing (a
            persistent buffer for the serving path, see
            :class:`~vllm_fastkv.kv_quantization.PackedRows`; default a fresh one, at the
            price of a memset).
        pack_pages: int32 ``[>= rows]``: ``p >= 0`` packs row ``i``'s page ``p`` (its
            blocks at columns ``p * R .. p * R + R - 1``, into the first) after the row's
            attention, whether or not the row is attended here; -1: nothing (default: no
            row). This is how a decoding request's next page is packed: at the end of
            the step whose token completes it, so the next step attends over it packed.
        stage: int32 ``[>= rows, page_words]`` scratch pages for ``pack_pages`` (default
            allocated when a row packs).

    The grid is ``rows x num_kv_heads x splits`` whatever the packed rows are, so the
    launch can be captured in a CUDA graph and replayed with other lengths and page
    counts.
    """
    check_kernel_layout(layout)
    rows = seq_lens.shape[0]
    if rows == 0:
        return output
    num_q_heads = query.shape[1]
    group = num_q_heads // layout.num_kv_heads
    words, halves = page_views(key_cache)
    key_scale, key_min, value_scale, value_min = layout.scale_offsets()
    splits = splits or decode_splits(rows, layout.num_kv_heads, query.device)
    part_max = torch.empty(rows, num_q_heads, splits, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(rows, num_q_heads, splits, layout.head_dim, dtype=torch.float32,
                           device=query.device)  # fmt: skip
    counts = rows * (layout.num_kv_heads + 1)
    if arrivals is None:
        arrivals = torch.zeros(counts, dtype=torch.int32, device=query.device)
    elif arrivals.dtype != torch.int32 or arrivals.numel() < counts:
        raise ValueError(f"arrivals must be int32 with at least {counts} entries, got "
                         f"{arrivals.dtype} [{arrivals.numel()}]")
    if pack_pages is None:
        pack_pages = torch.full((rows,), -1, dtype=torch.int32, device=query.device)
        stage = words[:1]  # never read or written
    elif stage is None:
        stage = torch.empty(rows, words.shape[1], dtype=torch.int32, device=query.device)
    elif stage.dtype != torch.int32 or stage.shape[0] < rows or stage.stride() != (
        words.shape[1], 1
    ):
        raise ValueError(f"stage must be contiguous int32 [>= {rows}, {words.shape[1]}], "
                         f"got {stage.dtype} {list(stage.shape)}")
    g_pad = max(triton.next_power_of_2(group), _MIN_DOT_ROWS)
    tile_blocks = tile_blocks or min(DEFAULT_TILE_BLOCKS,
                                     triton.next_power_of_2(layout.blocks_per_page))
    if tile_blocks & (tile_blocks - 1):
        raise ValueError(f"tile_blocks must be a power of two, got {tile_blocks}")
    # On GPUs the dots run in the cache's dtype (fp32 accumulation), like FlashAttention;
    # Triton's CPU interpreter mis-multiplies bf16 operands produced in registers, so
    # there (and for fp32 caches) they run in fp32.
    dot_dtype = _DOT_DTYPES.get(key_cache.dtype) if key_cache.is_cuda else None
    _packed_decode_kernel[(rows, layout.num_kv_heads, splits)](
        query, key_cache, value_cache, words, halves, block_table, query_start_loc, seq_lens,
        packed_pages, part_max, part_sum, part_acc, arrivals, output, pack_pages, stage,
        stage.view(torch.float16),
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *output.stride(),
        block_table.stride(0), words.shape[1], group, num_q_heads, scale * math.log2(math.e),
        splits,
        BITS=layout.bits, BLOCK=layout.block_size, DIM=layout.head_dim,
        VGROUP=layout.value_group, NUM_HEADS=layout.num_kv_heads, R=layout.blocks_per_page,
        HEAD_WORDS=layout.head_bytes // 4, VALUE_CODES=layout.value_codes_offset,
        KEY_SCALE=key_scale, KEY_MIN=key_min, VALUE_SCALE=value_scale, VALUE_MIN=value_min,
        G_PAD=g_pad, TILE_BLOCKS=tile_blocks,
        TILES_PER_PAGE=triton.cdiv(layout.blocks_per_page, tile_blocks),
        DOT_DTYPE=dot_dtype or tl.float32, DOT_PRECISION="ieee" if dot_dtype is None else "tf32",
        MERGE_G_PAD=triton.next_power_of_2(group),
        SPLITS_PAD=triton.next_power_of_2(max(splits, MAX_SPLITS)),
        USED_WORDS=layout.used_page_words, COPY_BLOCK=PAGE_COPY_WORDS,
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        num_stages=num_stages or DEFAULT_NUM_STAGES, maxnreg=max_registers or MAX_REGISTERS,
    )  # fmt: skip
    return output
