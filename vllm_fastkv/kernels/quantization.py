"""Low-bit packing of full-precision KV blocks into vLLM cache pages (Triton).

:func:`pack_kv` quantises groups of ``R`` full-precision blocks (keys per channel over a
block's tokens, values per token over channel groups; asymmetric, fp16 scale and
minimum) into the page of each group's first block, in the layout of
:mod:`vllm_fastkv.packed_layout`. The other ``R - 1`` blocks are then free.

Why two launches: a group's page is also its first source block, and programs of one
launch run in no particular order, so launch 1 only reads the cache and writes each
group's packed page to a scratch buffer, and launch 2 copies the scratch pages into the
cache (every read is done before any page is written). That is the prompt's packing, at
compression. A decoding request's next page is packed inside the decode attention launch
instead (:func:`vllm_fastkv.kernels.packed_decode_attention`, ``pack_pages``), with the
same per-block quantisation (:func:`_pack_block_head`) and copy (:func:`_copy_words`), so
decode steps launch nothing for it.

Arithmetic is that of :func:`vllm_fastkv.reference.quantization.quantize_groups_ref`
(and :func:`vllm_fastkv.kernels.reference.pack_kv_ref`), bit for bit: fp32
minimum and maximum, IEEE division (``tl.div_rn``), round half up, fp16 scales; codes are
combined into words as unsigned integers (disjoint bit fields, so a sum is an OR).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_fastkv.packed_layout import LowBitLayout, page_views

_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _quantize(low, high, LEVELS: tl.constexpr):
    """fp16 scale and minimum of groups with fp32 extremes ``low`` and ``high``."""
    scale = tl.minimum((high - low) / LEVELS, _FP16_MAX).to(tl.float16)
    minimum = tl.minimum(tl.maximum(low, -_FP16_MAX), _FP16_MAX).to(tl.float16)
    return scale, minimum


@triton.jit
def _codes(x, scale, minimum, LEVELS: tl.constexpr):
    """uint32 codes of ``x`` (scale and minimum broadcast to it); 0 where the scale is 0."""
    scale32 = scale.to(tl.float32)
    safe = tl.where(scale32 == 0.0, 1.0, scale32)
    q = tl.floor(tl.div_rn(x - minimum.to(tl.float32), safe) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
    return tl.where(scale32 == 0.0, 0.0, q).to(tl.uint32)


@triton.jit
def _pack_block_head(
    key_ptr, value_ptr, block, h, words_out, halves_out,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    BITS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, GROUP: tl.constexpr,
    VALUE_CODES: tl.constexpr, KEY_SCALE: tl.constexpr, KEY_MIN: tl.constexpr,
    VALUE_SCALE: tl.constexpr, VALUE_MIN: tl.constexpr,
):
    """Block ``block``, KV head ``h``: quantised into the head region whose words start
    at ``words_out`` (and whose fp16 halves at ``halves_out``). Shared by the packing
    launch and the decode kernel, which packs a decode page after attending."""
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = DIM // GROUP
    tok = tl.arange(0, BLOCK)
    dim = tl.arange(0, DIM)
    keys = tl.load(key_ptr + block * stride_kb + tok[:, None] * stride_ks + h * stride_kh
                   + dim[None, :] * stride_kd).to(tl.float32)  # [BLOCK, DIM]
    values = tl.load(value_ptr + block * stride_vb + tok[:, None] * stride_vs + h * stride_vh
                     + dim[None, :] * stride_vd).to(tl.float32)
    shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)

    # Keys: one group per channel over the block's tokens; words run along tokens.
    k_scale, k_min = _quantize(tl.min(keys, axis=0), tl.max(keys, axis=0), LEVELS)
    k_codes = _codes(keys, k_scale[None, :], k_min[None, :], LEVELS)
    KEY_WORDS: tl.constexpr = BLOCK // PER_WORD
    k_words = tl.sum(tl.reshape(k_codes, [KEY_WORDS, PER_WORD, DIM]) << shifts[None, :, None],
                     axis=1)  # [KEY_WORDS, DIM]
    word = tl.arange(0, KEY_WORDS)
    tl.store(words_out + dim[None, :] * KEY_WORDS + word[:, None],
             k_words.to(tl.int32, bitcast=True))
    tl.store(halves_out + KEY_SCALE + dim, k_scale)
    tl.store(halves_out + KEY_MIN + dim, k_min)

    # Values: per token, one group per GROUP channels; words run along channels.
    grouped = tl.reshape(values, [BLOCK, NG, GROUP])
    v_scale, v_min = _quantize(tl.min(grouped, axis=2), tl.max(grouped, axis=2), LEVELS)
    v_codes = tl.reshape(_codes(grouped, v_scale[:, :, None], v_min[:, :, None], LEVELS),
                         [BLOCK, DIM])
    VALUE_WORDS: tl.constexpr = DIM // PER_WORD
    v_words = tl.sum(
        tl.reshape(v_codes, [BLOCK, VALUE_WORDS, PER_WORD]) << shifts[None, None, :], axis=2
    )  # [BLOCK, VALUE_WORDS]
    word = tl.arange(0, VALUE_WORDS)
    tl.store(words_out + VALUE_CODES + tok[:, None] * VALUE_WORDS + word[None, :],
             v_words.to(tl.int32, bitcast=True))
    grp = tl.arange(0, NG)
    tl.store(halves_out + VALUE_SCALE + tok[:, None] * NG + grp[None, :], v_scale)
    tl.store(halves_out + VALUE_MIN + tok[:, None] * NG + grp[None, :], v_min)


@triton.jit
def _stage_head_region(stage_words_ptr, stage_halves_ptr, page, r, h, page_words,
                       NUM_HEADS: tl.constexpr, HEAD_WORDS: tl.constexpr):
    """Word and fp16 pointers of sub-block ``r``, head ``h``'s region of scratch page
    ``page`` (``page_words`` int32 words a page)."""
    start = page.to(tl.int64) * page_words + (r * NUM_HEADS + h).to(tl.int64) * HEAD_WORDS
    return stage_words_ptr + start, stage_halves_ptr + 2 * start


@triton.jit
def _pack_kernel(
    key_ptr, value_ptr, src_ptr, stage_words_ptr, stage_halves_ptr,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_src, page_words,
    BITS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, GROUP: tl.constexpr,
    NUM_HEADS: tl.constexpr, HEAD_WORDS: tl.constexpr, VALUE_CODES: tl.constexpr,
    KEY_SCALE: tl.constexpr, KEY_MIN: tl.constexpr, VALUE_SCALE: tl.constexpr,
    VALUE_MIN: tl.constexpr,
):
    """Program (group g, sub-block r, head h): block ``src[g, r]``, head ``h`` into the
    ``(r, h)`` region of group ``g``'s scratch page."""
    g = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    block = tl.load(src_ptr + g * stride_src + r).to(tl.int64)
    words_out, halves_out = _stage_head_region(stage_words_ptr, stage_halves_ptr, g, r, h,
                                               page_words, NUM_HEADS, HEAD_WORDS)
    _pack_block_head(key_ptr, value_ptr, block, h, words_out, halves_out,
                     stride_kb, stride_ks, stride_kh, stride_kd,
                     stride_vb, stride_vs, stride_vh, stride_vd,
                     BITS, BLOCK, DIM, GROUP, VALUE_CODES, KEY_SCALE, KEY_MIN, VALUE_SCALE,
                     VALUE_MIN)  # fmt: skip


@triton.jit
def _copy_words(dst_ptr, src_ptr, start, count, BLOCK: tl.constexpr):
    """Words ``[start, start + BLOCK)`` (those below ``count``) of ``src`` into ``dst``.
    Read through L2 (``.cg``): the decode kernel copies scratch pages that other
    programs of the same launch wrote."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < count
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask, cache_modifier=".cg"),
             mask=mask)


@triton.jit
def _copy_pages_kernel(
    words_ptr, stage_ptr, src_ptr, stride_src, page_words, used_words, BLOCK: tl.constexpr,
):
    """Program (group g, tile): scratch page ``g``'s words into page ``src[g, 0]``."""
    g = tl.program_id(0)
    page = tl.load(src_ptr + g * stride_src).to(tl.int64)
    _copy_words(words_ptr + page * page_words, stage_ptr + g.to(tl.int64) * page_words,
                tl.program_id(1) * BLOCK, used_words, BLOCK)


#: int32 words a program copies at a time from a scratch page into the cache.
COPY_BLOCK = 1024


def check_kernel_layout(layout: LowBitLayout) -> None:
    """The Triton kernels tile whole blocks, heads and value groups (powers of two), and
    take one scale for all codes of a packed word."""
    for name in ("block_size", "head_dim", "value_group", "value_groups"):
        value = getattr(layout, name)
        if value & (value - 1):
            raise ValueError(f"low-bit KV kernels need a power-of-two {name}, got {value}")
    if layout.value_group % layout.per_word:
        # The decode kernel dequantises a word's codes with one scale.
        raise ValueError(
            f"low-bit KV kernels need kv_group_size a multiple of {layout.per_word} at "
            f"{layout.bits} bits, got {layout.value_group}"
        )


def pack_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_blocks: torch.Tensor,
    layout: LowBitLayout,
) -> None:
    """Quantise each group of full-precision blocks into its first block's page, in place.

    Args:
        key_cache, value_cache: the layer's views ``[num_blocks, block_size, heads, dim]``
            into one allocation whose blocks are dense pages (vLLM's layouts).
        src_blocks: int ``[n, R]`` block ids of each group's ``R = layout.blocks_per_page``
            blocks in logical order; the packed page is written over ``src_blocks[g, 0]``.
            No block may appear in two groups.
        layout: the packed layout of these pages.
    """
    check_kernel_layout(layout)
    groups = src_blocks.shape[0]
    if src_blocks.dim() != 2 or src_blocks.shape[1] != layout.blocks_per_page:
        raise ValueError(f"src_blocks must be [n, {layout.blocks_per_page}]")
    if groups == 0:
        return
    words, _ = page_views(key_cache)
    page_words = words.shape[1]
    stage = torch.empty(groups, page_words, dtype=torch.int32, device=words.device)
    key_scale, key_min, value_scale, value_min = layout.scale_offsets()
    _pack_kernel[(groups, layout.blocks_per_page, layout.num_kv_heads)](
        key_cache, value_cache, src_blocks, stage, stage.view(torch.float16),
        *key_cache.stride(), *value_cache.stride(), src_blocks.stride(0), page_words,
        BITS=layout.bits, BLOCK=layout.block_size, DIM=layout.head_dim,
        GROUP=layout.value_group, NUM_HEADS=layout.num_kv_heads,
        HEAD_WORDS=layout.head_bytes // 4, VALUE_CODES=layout.value_codes_offset,
        KEY_SCALE=key_scale, KEY_MIN=key_min, VALUE_SCALE=value_scale, VALUE_MIN=value_min,
    )  # fmt: skip
    # Launch order on the stream is the safety argument: every source block was read.
    used_words = layout.used_page_words
    _copy_pages_kernel[(groups, triton.cdiv(used_words, COPY_BLOCK))](
        words, stage, src_blocks, src_blocks.stride(0), page_words, used_words,
        BLOCK=COPY_BLOCK,
    )  # fmt: skip
