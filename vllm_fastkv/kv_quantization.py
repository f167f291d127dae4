"""Low-bit KV inside vLLM: pack retained prompt KV into pages, attend over packed rows.

With ``kv_bits`` 4 or 2, the step that compresses a prompt also folds its kept slots, in
every layer right after compaction, into packed pages (:func:`pack_prompt_pages`); the
scheduler then returns all but the first block of every page to vLLM's pool
(:mod:`vllm_fastkv.retention_scheduler`), so the freed memory is counted by vLLM's own
free-block accounting and admits more requests. :func:`attend_packed` computes the
decode rows' attention over their packed pages and full-precision blocks; when a
decoding request's token completes one more page past ``kv_residual``, the scheduler
asks for it, and the same launch packs it in every layer of that step, after attending
(the next step reads it packed). With ``evicted_bits`` (mixed precision) the pages hold
what retention evicted, all packed at compression.
In a batch of single-token decode rows it attends every row, packed or not, and vLLM's
attention is not called at all (its launches cost ~12 us a layer even over one token a
row); in a mixed batch vLLM's attention runs first, with a packed row's length cut to one token, and
:func:`attend_packed` overwrites the packed rows' outputs. Packed rows are decode rows
(one query): packing happens when the prompt is complete, and a preempted request is
recomputed from scratch.

On CUDA the Triton kernels run; on CPUs their torch references. Layout and arithmetic:
:mod:`vllm_fastkv.packed_layout`, :mod:`vllm_fastkv.kernels.quantization`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_fastkv import kernels
from vllm_fastkv.config import FastKVConfig, FastKVConfigError
from vllm_fastkv.kernels.quantization import check_kernel_layout
from vllm_fastkv.packed_layout import LowBitLayout

#: Attribute of a built attention metadata object holding its :class:`PackedRows`.
PACKED_ATTR = "fastkv_packed"


@dataclass
class PackedRows:
    """A step's rows as packed-KV attention reads them (persistent buffers, all rows).

    ``pages[i]``: packed pages at the front of row ``i``'s shifted block table (0: none,
    the row is attended over its full-precision blocks; -1: the row keeps vLLM's attention
    output); ``seq_lens[i]``: the tokens the row attends to from its start slot on;
    ``pack_pages[i]``: the page row ``i`` packs after attending in this step, or -1.
    ``attends_all``: a batch of single-token decode rows, all attended here, so vLLM's
    attention is skipped (a CUDA graph captured for such a batch has no call of it).
    """

    pages: torch.Tensor  # int32 [rows]
    seq_lens: torch.Tensor  # int32 [rows]
    block_table: torch.Tensor  # int32 [rows, max_blocks], shifted
    query_start_loc: torch.Tensor  # int32 [rows + 1]
    layout: LowBitLayout  # the engine's, computed once at start-up
    pack_pages: torch.Tensor  # int32 [rows]
    #: int32 ``[max rows, page_words]``: the scratch pages ``pack_pages`` go through.
    stage: torch.Tensor
    attends_all: bool
    #: int32 ``[max rows x (num_kv_heads + 1)]``, zero between launches: the packed decode
    #: kernel's arrival counts (its splits per (row, KV head), then per row for packing),
    #: which every layer reuses.
    arrivals: torch.Tensor


def engine_layout(kv_cache_spec: Any, settings: FastKVConfig) -> LowBitLayout:
    """The packed layout of an engine's pages, from its KV cache spec; a format that
    cannot be packed is a start-up error naming ``kv_bits`` (or ``evicted_bits``)."""
    try:
        layout = LowBitLayout(
            bits=settings.packed_bits,
            block_size=kv_cache_spec.block_size,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            head_dim=kv_cache_spec.head_size,
            value_group=min(settings.kv_group_size, kv_cache_spec.head_size),
            page_bytes=kv_cache_spec.page_size_bytes,
        )
        check_kernel_layout(layout)
    except ValueError as exc:
        raise FastKVConfigError(
            f"Invalid FastKV setting {settings.packed_bits_setting}: {exc}"
        ) from None
    return layout


def pack_prompt_pages(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    pages: list[int],
    layout: LowBitLayout,
) -> None:
    """Pack ``pages[i]`` pages of row ``i`` of ``block_tables``, from slot ``starts[i]`` on.

    Page ``k`` of a row folds its blocks ``starts[i] / block_size + k * R + (0 .. R-1)``
    into the first of them. The block ids are gathered on the device, so no sync.
    """
    per_page = layout.blocks_per_page
    rows, columns = [], []
    for i, (start, count) in enumerate(zip(starts, pages)):
        first = start // layout.block_size
        for column in range(first, first + count * per_page):
            rows.append(i)
            columns.append(column)
    if not rows:
        return
    device = block_tables.device
    src = block_tables[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]
    src = src.view(-1, per_page)
    pack = kernels.pack_kv if key_cache.is_cuda else kernels.pack_kv_ref
    pack(key_cache, value_cache, src, layout)


def attend_packed(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    rows: PackedRows,
    output: torch.Tensor,
    *,
    scale: float,
) -> None:
    """Write the attention output of every row with ``rows.pages >= 0``, then pack the
    pages ``rows.pack_pages`` asks for.

    On CUDA the kernel is launched for every step, packed rows or not, so decode steps
    captured in CUDA graphs replay it; rows marked -1 return at once (after packing, if
    they pack).
    """
    args = (query, key_cache, value_cache, rows.block_table, rows.query_start_loc,
            rows.seq_lens, rows.pages, output)
    if key_cache.is_cuda:
        kernels.packed_decode_attention(*args, scale=scale, layout=rows.layout,
                                        arrivals=rows.arrivals, pack_pages=rows.pack_pages,
                                        stage=rows.stage)  # fmt: skip
    else:
        kernels.packed_decode_attention_ref(*args, scale=scale, layout=rows.layout,
                                            pack_pages=rows.pack_pages)  # fmt: skip
