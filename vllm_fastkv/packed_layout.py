"""Where low-bit KV lives inside vLLM's paged cache: the packed page layout.

KIVI-style asymmetric quantisation (per group: ``min`` and ``scale = (max - min) /
(2^bits - 1)``, both stored as fp16): keys per channel over the tokens of one cache block,
values per token over groups of ``value_group`` channels. A *page* is one vLLM cache
block of one layer (``block_size x num_kv_heads x 2 x head_dim`` elements); packed, it
holds the quantised K and V of ``blocks_per_page`` (``R``) full-precision blocks, so R
consecutive logical blocks of a request fold into the first one's page and the other
``R - 1`` blocks go back to vLLM's pool.

Page layout, for sub-block ``r < R`` (the ``r``-th folded logical block) and KV head
``h``, a region of :attr:`LowBitLayout.head_bytes` at byte ``(r * num_kv_heads + h) *
head_bytes``, in this order:

* key codes: ``head_dim`` channels x ``key_words`` int32 words; word ``w`` of channel
  ``d`` holds tokens ``w * per_word + i`` (``per_word = 32 / bits``) in bits
  ``[i * bits, (i + 1) * bits)``;
* value codes: ``block_size`` tokens x ``value_words`` int32 words; word ``w`` of token
  ``t`` holds channels ``w * per_word + i`` in the same way;
* key scales, then key minimums: fp16 ``[head_dim]`` each;
* value scales, then value minimums: fp16 ``[block_size, value_groups]`` each.

Every region is a whole number of words, so the page can be read through int32 and fp16
views of the same bytes. Nothing here imports triton: the scheduler needs ``R`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Bits per stored code that the packed layout supports (16 means "not packed").
LOW_BITS = (2, 4)
_WORD_BITS = 32
_HALF_BYTES = 2
_WORD_BYTES = 4


def codes_per_word(bits: int) -> int:
    """Codes of ``bits`` bits per int32 word (the decode kernel gives all of them one
    scale, so a value group holds whole words: the config checks it at start-up)."""
    return _WORD_BITS // bits


@dataclass(frozen=True)
class LowBitLayout:
    """The packed layout of one layer's pages (see the module docstring)."""

    bits: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    value_group: int
    page_bytes: int

    def __post_init__(self) -> None:
        if self.bits not in LOW_BITS:
            raise ValueError(f"kv_bits must be one of {LOW_BITS} to pack, got {self.bits}")
        if self.block_size * self.bits % _WORD_BITS or self.head_dim * self.bits % _WORD_BITS:
            raise ValueError(
                f"block_size ({self.block_size}) and head_dim ({self.head_dim}) times "
                f"kv_bits ({self.bits}) must be multiples of {_WORD_BITS}"
            )
        if self.value_group < 1 or self.head_dim % self.value_group:
            raise ValueError(
                f"kv_group_size ({self.value_group}) must divide head_dim ({self.head_dim})"
            )
        if self.blocks_per_page < 2:
            raise ValueError(
                f"{self.bits}-bit KV saves no memory with {self.page_bytes}-byte pages "
                f"(block_size {self.block_size}, {self.num_kv_heads} KV heads, head_dim "
                f"{self.head_dim}): a packed block needs {self.subblock_bytes} bytes"
            )

    @classmethod
    def for_cache(cls, key_cache: torch.Tensor, bits: int, value_group: int) -> LowBitLayout:
        """The layout of a layer whose K view is ``[num_blocks, block_size, heads, dim]``."""
        _, block_size, num_kv_heads, head_dim = key_cache.shape
        page_bytes = block_size * num_kv_heads * 2 * head_dim * key_cache.element_size()
        return cls(bits, block_size, num_kv_heads, head_dim, min(value_group, head_dim),
                   page_bytes)  # fmt: skip

    # ------------------------------------------------------------- sizes
    @property
    def per_word(self) -> int:
        """Codes per int32 word."""
        return codes_per_word(self.bits)

    @property
    def key_words(self) -> int:
        """Words per key channel (one block's tokens)."""
        return self.block_size // self.per_word

    @property
    def value_words(self) -> int:
        """Words per value token (its channels)."""
        return self.head_dim // self.per_word

    @property
    def value_groups(self) -> int:
        return self.head_dim // self.value_group

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head of one packed block."""
        codes = (self.head_dim * self.key_words + self.block_size * self.value_words) * _WORD_BYTES
        scales = 2 * (self.head_dim + self.block_size * self.value_groups) * _HALF_BYTES
        return codes + scales

    @property
    def subblock_bytes(self) -> int:
        """Bytes of one packed block, all KV heads."""
        return self.num_kv_heads * self.head_bytes

    @property
    def blocks_per_page(self) -> int:
        """``R``: full-precision blocks whose packed form fits one page."""
        return self.page_bytes // self.subblock_bytes

    @property
    def used_page_words(self) -> int:
        """int32 words of a page that its ``R`` packed blocks occupy (the rest is unused)."""
        return self.blocks_per_page * self.subblock_bytes // _WORD_BYTES

    @property
    def page_tokens(self) -> int:
        """Logical tokens one packed page holds."""
        return self.blocks_per_page * self.block_size

    # ------------------------------------------------------------- offsets
    # Offsets of (sub-block r, head h)'s regions: in words for codes, halves for scales.
    def head_words_start(self, r: int, h: int) -> int:
        return (r * self.num_kv_heads + h) * self.head_bytes // _WORD_BYTES

    @property
    def value_codes_offset(self) -> int:
        """Words from a head region's start to its value codes."""
        return self.head_dim * self.key_words

    @property
    def scales_offset(self) -> int:
        """Halves from a head region's start to its key scales."""
        return (self.value_codes_offset + self.block_size * self.value_words) * 2

    def scale_offsets(self) -> tuple[int, int, int, int]:
        """Halves from a head region's start to: key scales, key mins, value scales,
        value mins."""
        key_scale = self.scales_offset
        key_min = key_scale + self.head_dim
        value_scale = key_min + self.head_dim
        value_min = value_scale + self.block_size * self.value_groups
        return key_scale, key_min, value_scale, value_min


def page_views(key_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 and fp16 views ``[num_blocks, page_bytes / 4 | 2]`` of a layer's pages.

    ``key_cache`` is the layer's K view ``[num_blocks, block_size, heads, dim]`` into the
    allocation that interleaves K and V per block (vLLM's FlashAttention and Triton
    layouts, NHD or HND): each block's K and V occupy one dense page, starting where its
    K view starts.
    """
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    page_elems = block_size * num_kv_heads * 2 * head_dim
    if key_cache.stride(0) != page_elems:
        raise ValueError(f"cache blocks are not dense pages (stride {key_cache.stride(0)})")
    pages = key_cache.as_strided((num_blocks, page_elems), (page_elems, 1))
    raw = pages.view(torch.uint8)
    return raw.view(torch.int32), raw.view(torch.float16)
