"""The worker side of KV retention: per-step plan rows and the attention's view.

The scheduler's :class:`~vllm_fastkv.retention.RetentionStepPlan` names requests; the
attention metadata builders see batch rows. Two small hooks on vLLM's model runners (the
V1 runner used on CPUs, the V2 runner used on GPUs) publish, once a step's batch order is
fixed, which request sits in which row; :class:`RetentionMetadataBuilderMixin` then

* shifts every compressed row's block table by ``start / block_size`` and its sequence
  length by ``start``, so attention reads slots ``[start, seq_len)`` only (the blocks
  before ``start`` are back in vLLM's pool), and
* hands the attention layers a :class:`CompressionBatch` for the rows whose prompt
  completes in this step.

The shifted tables and lengths live in buffers allocated once per builder and rewritten
in place every step, compression or not, so CUDA graphs captured through this builder
replay against the same addresses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.engine_config import engine_fastkv_config
from vllm_fastkv.kv_quantization import PACKED_ATTR, PackedRows, engine_layout
from vllm_fastkv.packed_layout import LowBitLayout
from vllm_fastkv.propagation import PROPAGATION_ATTR, LateBatch, late_layout
from vllm_fastkv.retention import STEP_PLAN_ATTR, PromptRetention, RetentionStepPlan
from vllm_fastkv.retention_stats import COMPRESSION_SECONDS, CompressionTimer

#: Attribute of a built attention metadata object holding its :class:`CompressionBatch`.
COMPRESSION_ATTR = "fastkv_compression"


@dataclass
class StepRows:
    """A step's plan and the request of each batch row, as the runner ordered them."""

    req_ids: list[str]
    plan: RetentionStepPlan
    timer: CompressionTimer = dataclasses.field(default_factory=CompressionTimer)

    @functools.cached_property
    def starts(self) -> list[int]:
        """Per row: the first slot attention reads (0 for uncompressed requests)."""
        return [self.plan.starts.get(req_id, 0) for req_id in self.req_ids]

    @functools.cached_property
    def packed(self) -> list[int]:
        """Per row: packed low-bit pages at the front of its kept slots (0: none)."""
        return [self.plan.packed.get(req_id, 0) for req_id in self.req_ids]

    @functools.cached_property
    def pack_rows(self) -> list[tuple[int, int]]:
        """``(row, page index)`` of decode rows that pack one more page after this step's
        attention."""
        return [
            (row, self.plan.pack[req_id][0])
            for row, req_id in enumerate(self.req_ids)
            if req_id in self.plan.pack
        ]

    @functools.cached_property
    def compress_rows(self) -> list[tuple[int, PromptRetention]]:
        return [
            (row, self.plan.compress[req_id])
            for row, req_id in enumerate(self.req_ids)
            if req_id in self.plan.compress
        ]


_current_step: StepRows | None = None


def current_step() -> StepRows | None:
    """The step being executed by this worker's runner, if it carries a retention plan."""
    return _current_step


def publish_step(scheduler_output: Any, req_ids: list[str]) -> None:
    global _current_step
    plan = getattr(scheduler_output, STEP_PLAN_ATTR, None)
    _current_step = StepRows(list(req_ids), plan) if plan else None


#: Timers of finished steps whose GPU work may still be running (observed once done).
_pending_timers: list[CompressionTimer] = []


def _end_step() -> None:
    """Forget the step's plan; report compression times that are known by now."""
    global _current_step
    if _current_step is not None and _current_step.timer.used:
        _pending_timers.append(_current_step.timer)
    _current_step = None
    while _pending_timers and _pending_timers[0].ready():
        COMPRESSION_SECONDS.observe(_pending_timers.pop(0).seconds())


def install_runner_hooks() -> None:
    """Wrap the loaded model runners so each step publishes its rows (idempotent).

    V1 (``GPUModelRunner``, also the CPU runner's base): rows are final once
    ``_prepare_inputs`` returns (reordering happens before it), in ``input_batch.req_ids``.
    V2 (``vllm.v1.worker.gpu.model_runner``): ``prepare_inputs`` returns the batch.
    Both clear the step when ``execute_model`` returns, so dummy and profiling runs,
    which build metadata without a scheduler step, never see a stale plan.
    """
    import sys

    v1 = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if v1 is not None:
        _hook(v1.GPUModelRunner, "_prepare_inputs", _v1_rows)
    v2 = sys.modules.get("vllm.v1.worker.gpu.model_runner")
    if v2 is not None:
        _hook(v2.GPUModelRunner, "prepare_inputs", _v2_rows)


def _hook(cls: type, prepare: str, rows: Callable[[Any, Any, Any], list[str]]) -> None:
    """Publish the step after ``cls.<prepare>`` returns (``rows(runner, scheduler_output,
    result)`` gives the batch order) and end it when ``execute_model`` returns."""
    if getattr(cls, "_fastkv_hooked", False):
        return
    inner_prepare, inner_execute = getattr(cls, prepare), cls.execute_model

    @functools.wraps(inner_prepare)
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = inner_prepare(self, scheduler_output, *args, **kwargs)
        publish_step(scheduler_output, rows(self, scheduler_output, result))
        return result

    @functools.wraps(inner_execute)
    def execute_model(self, *args, **kwargs):
        try:
            return inner_execute(self, *args, **kwargs)
        finally:
            _end_step()

    setattr(cls, prepare, prepare_inputs)
    cls.execute_model = execute_model
    cls._fastkv_hooked = True


def _v1_rows(runner, scheduler_output, _result) -> list[str]:
    return runner.input_batch.req_ids[: len(scheduler_output.num_scheduled_tokens)]


def _v2_rows(_runner, _scheduler_output, input_batch) -> list[str]:
    return input_batch.req_ids


@dataclass
class CompressionBatch:
    """The rows whose prompt completes in this step, ready for the attention layers.

    ``rows`` are batch rows; tensors live on the cache's device. ``scored_lens`` is the
    number of keys each row's window scores (the prompt length, or the ``P`` propagated
    tokens in layers after ``tsp_layer``), in the row's (possibly shifted) block table.
    The lengths and budgets also stay on the host: every layer scores and selects, and
    the kernels size their outputs from them, so host copies spare a device sync per layer.
    """

    rows: list[int]
    query_ends: torch.Tensor  # int64 [n]: one past each row's last query token
    block_tables: torch.Tensor  # int32 [n, max_blocks]
    scored_lens: torch.Tensor  # int32 [n]
    scored_lens_host: list[int]
    budgets: list[int]  # entries selected per head (B')
    starts: torch.Tensor  # int64 [n]: first slot of the kept entries
    starts_host: list[int]
    packed_pages: list[int]  # low-bit pages to pack from each row's start slot
    #: Mixed precision: the selected entries go to ``[S, T)`` (``S = T - budget``), the
    #: evicted ones to ``[0, S)``; else the evicted ones are dropped.
    keeps_evicted: bool
    timer: CompressionTimer  # the step's
    layout: LowBitLayout | None  # low-bit KV's page layout (None: 16 bits)
    window: int
    pool_kernel: int
    pooling: str
    selection: str
    #: The latest layer's window scores ``[n, num_kv_heads, width]``; token-selective
    #: propagation reads those of ``tsp_layer``.
    scores: torch.Tensor | None = None


#: A row to compress: (batch row, scored length, start slot, entries kept per head, packed
#: low-bit pages).
CompressEntry = tuple[int, int, int, int, int]


class RetentionViews:
    """Persistent block-table and sequence-length buffers with compressed rows shifted."""

    def __init__(
        self,
        settings: FastKVConfig,
        max_rows: int,
        block_size: int,
        device: torch.device,
        layout: LowBitLayout | None = None,
        stage: torch.Tensor | None = None,
    ) -> None:
        self.settings = settings
        self.max_rows = max_rows
        self.block_size = block_size
        self.device = device
        self.block_table: torch.Tensor | None = None
        self.seq_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.skip_blocks = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self._skip_host = torch.zeros(max_rows, dtype=torch.int64, pin_memory=_pinned(device))
        self._columns: torch.Tensor | None = None
        # Low-bit KV (``layout``): per row, packed pages and the page packed after
        # attending in this step (one host-to-device copy of both), the length the packed
        # attention reads, and the scratch pages the packing goes through (``stage``,
        # shared by all views).
        self.layout = layout
        self.row_pages: torch.Tensor | None = None
        if layout is not None:
            self.row_pages = torch.zeros(2, max_rows, dtype=torch.int32, device=device)
            self._row_pages_host = torch.zeros(2, max_rows, dtype=torch.int32,
                                               pin_memory=_pinned(device))  # fmt: skip
            self.packed_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
            self.stage = stage
            self.arrivals = torch.zeros(max_rows * (layout.num_kv_heads + 1),
                                        dtype=torch.int32, device=device)  # fmt: skip

    def apply(
        self,
        common: CommonAttentionMetadata,
        starts: list[int],
        packed: list[int],
        pack: list[tuple[int, int]] = (),
    ) -> tuple[CommonAttentionMetadata, PackedRows | None]:
        """``common`` with row ``i`` reading its cache from slot ``starts[i]`` on, and, with
        low-bit KV, the rows' packed pages (``packed[i]``, including pages ``pack``
        ``(row, page)`` packs in this step) for
        :func:`~vllm_fastkv.kv_quantization.attend_packed`."""
        table = common.block_table_tensor
        rows, width = table.shape
        seq_rows = common.seq_lens.shape[0]
        if rows > self.max_rows or seq_rows > self.max_rows:
            raise ValueError(f"{rows} batch rows exceed the {self.max_rows} FastKV buffers hold")
        if self.block_table is None or self.block_table.shape[1] != width:
            self.block_table = torch.zeros(
                self.max_rows, width, dtype=table.dtype, device=self.device
            )
            self._columns = torch.arange(width, device=self.device)
        out_table = self.block_table[:rows]
        out_lens = self.seq_lens[:seq_rows]
        if any(starts):
            skip = self._skip_host[: max(rows, seq_rows)]
            skip.zero_()
            skip[: len(starts)] = torch.tensor(starts, dtype=torch.int64) // self.block_size
            skip_blocks = self.skip_blocks[: skip.numel()]
            skip_blocks.copy_(skip, non_blocking=True)
            columns = self._columns[None, :] + skip_blocks[:rows, None]
            shifted = table.gather(1, columns.clamp_(max=width - 1))
            out_table.copy_(shifted.masked_fill_(columns >= width, 0))
            torch.sub(common.seq_lens, skip_blocks[:seq_rows] * self.block_size, out=out_lens)
        else:
            out_table.copy_(table)
            out_lens.copy_(common.seq_lens)
        shifted = dataclasses.replace(common, block_table_tensor=out_table, seq_lens=out_lens)
        if self.row_pages is None:
            return shifted, None
        return shifted, self._packed_rows(common, out_table, out_lens, packed, pack)

    def _packed_rows(
        self,
        common: CommonAttentionMetadata,
        table: torch.Tensor,
        lens: torch.Tensor,
        packed: list[int],
        pack: list[tuple[int, int]],
    ) -> PackedRows:
        """Fill the packed-row buffers (every step, so captured graphs see current values).

        A batch of single-token decode rows is attended by the packed-KV kernel alone
        (every row ``pages >= 0``). In other batches rows without packed pages are marked
        -1, for vLLM's attention, which sees one token of each packed row (``lens`` cut).
        """
        seq_rows = lens.shape[0]
        attends_all = common.max_query_len == 1
        if any(packed):
            query_start = common.query_start_loc_cpu.tolist()
            for row, pages in enumerate(packed):
                if pages and query_start[row + 1] - query_start[row] != 1:
                    raise RuntimeError(
                        f"FastKV: batch row {row} has packed KV but "
                        f"{query_start[row + 1] - query_start[row]} queries (decode only)"
                    )
        host = self._row_pages_host
        host[0].fill_(0 if attends_all else -1)
        marked = packed if attends_all else [pages or -1 for pages in packed]
        host[0, : len(packed)] = torch.tensor(marked, dtype=torch.int32)
        # A page packed after attending: the R blocks from column page * R of the row's
        # shifted table (-1 everywhere else, padding rows of a captured batch included).
        host[1].fill_(-1)
        for row, page in pack:
            host[1, row] = page
        self.row_pages.copy_(host, non_blocking=True)
        pages = self.row_pages[0, :seq_rows]
        packed_lens = self.packed_lens[:seq_rows]
        packed_lens.copy_(lens)
        if not attends_all:
            lens.masked_fill_(pages > 0, 1)
        return PackedRows(pages, packed_lens, table, common.query_start_loc, self.layout,
                          self.row_pages[1, :seq_rows], self.stage, attends_all,
                          self.arrivals)  # fmt: skip

    def compression_batch(
        self, common: CommonAttentionMetadata, entries: list[CompressEntry], step: StepRows
    ) -> CompressionBatch | None:
        """The rows of ``common`` to compress in this step, with ``common``'s block tables."""
        if not entries:
            return None
        rows, scored, starts, kept, pages = (list(column) for column in zip(*entries))
        ends = common.query_start_loc_cpu[torch.tensor(rows) + 1].to(torch.int64)
        index = torch.tensor(rows, device=self.device)
        return CompressionBatch(
            rows=rows,
            query_ends=ends.to(self.device),
            block_tables=common.block_table_tensor.index_select(0, index),
            scored_lens=torch.tensor(scored, dtype=torch.int32, device=self.device),
            scored_lens_host=scored,
            budgets=kept,
            starts=torch.tensor(starts, device=self.device),
            starts_host=starts,
            packed_pages=pages,
            keeps_evicted=self.settings.keeps_evicted,
            timer=step.timer,
            layout=self.layout,
            window=self.settings.window,
            pool_kernel=self.settings.pool_kernel,
            pooling=self.settings.pooling,
            selection=self.settings.selection,
        )


def _pinned(device: torch.device) -> bool:
    return device.type == "cuda"


class RetentionMetadataBuilderMixin:
    """Mix into a vLLM attention metadata builder (before it in the bases)."""

    # The runner may not hand this builder's metadata a different block table.
    supports_update_block_table: bool = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """With low-bit KV, full CUDA graphs of single-token decode batches only: those
        are captured without vLLM's attention (the packed-KV kernel attends every row),
        and vLLM replays a graph captured from such a batch for mixed batches of as many
        tokens otherwise (their other batches run piecewise, attention eager)."""
        support = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        if engine_fastkv_config(vllm_config).quantizes:
            return min(support, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE,
                       key=lambda level: level.value)  # fmt: skip
        return support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.fastkv_views: RetentionViews | None = None
        self.fastkv_late_views: RetentionViews | None = None
        settings = engine_fastkv_config(vllm_config)
        if settings.compresses:
            max_rows = vllm_config.scheduler_config.max_num_seqs
            layout = stage = None
            if settings.quantizes:
                layout = engine_layout(kv_cache_spec, settings)
                stage = torch.empty(max_rows, layout.page_bytes // 4, dtype=torch.int32,
                                    device=device)  # fmt: skip
            args = (settings, max_rows, kv_cache_spec.block_size, device, layout, stage)
            self.fastkv_views = RetentionViews(*args)
            if settings.propagates:
                # Layers after tsp_layer attend with their own metadata in the same step.
                self.fastkv_late_views = RetentionViews(*args)
            install_runner_hooks()

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
        **kwargs: Any,
    ):
        views = self.fastkv_views
        if views is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        step = current_step()
        batch = None
        if step is not None:
            # Compressing rows start at slot 0 in this step: no shift to account for.
            entries = [(row, r.prompt_len, r.start, r.kept, r.packed_pages)
                       for row, r in step.compress_rows]  # fmt: skip
            batch = views.compression_batch(common_attn_metadata, entries, step)
        shifted, packed = views.apply(common_attn_metadata, step.starts if step else [],
                                      step.packed if step else [],
                                      step.pack_rows if step else [])  # fmt: skip
        # Cascade attention assumes one shared, unshifted prefix: never with retention.
        metadata = super().build(0, shifted, fast_build, **kwargs)
        setattr(metadata, COMPRESSION_ATTR, batch)
        setattr(metadata, PACKED_ATTR, packed)
        if step is not None and step.plan.shortens and self.fastkv_late_views is not None:
            setattr(metadata, PROPAGATION_ATTR, self._build_late(common_attn_metadata, step))
        return metadata

    def _build_late(self, common: CommonAttentionMetadata, step: StepRows) -> LateBatch:
        """Metadata of the shortened batch that layers after ``tsp_layer`` run over."""
        views = self.fastkv_late_views
        layout = late_layout(common, step, views.block_size)
        shifted, packed = views.apply(layout.common, layout.starts, layout.packed,
                                      layout.pack)  # fmt: skip
        # fast_build: FA3's ahead-of-time schedule lives in a buffer shared with the
        # step's own metadata, which layers 0..tsp_layer use.
        metadata = super().build(0, shifted, True)
        setattr(metadata, COMPRESSION_ATTR,
                views.compression_batch(shifted, layout.compress, step))
        setattr(metadata, PACKED_ATTR, packed)
        return LateBatch(
            metadata=metadata,
            slot_mapping=layout.common.slot_mapping,
            num_tokens=layout.common.num_actual_tokens,
            keep_src=layout.keep_src,
            keep_dst=layout.keep_dst,
            propagated=layout.propagated,
            stash=layout.stash,
        )
