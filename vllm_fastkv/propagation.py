"""Token-selective propagation (TSP): later layers run over the selected prompt tokens only.

In the step that completes a prompt, layers ``0..tsp_layer`` run over the whole step as
in stock vLLM (and compress their KV, :mod:`vllm_fastkv.kv_compression`). Layer
``tsp_layer``'s window scores, summed over KV heads, then pick ``P`` tokens per prompt;
only their hidden states continue through the later layers, at their original RoPE
positions, while decode tokens and other requests' prefill chunks of the same step pass
through unchanged. Non-final chunks of a propagated prompt stop after ``tsp_layer``:
their hidden states wait in a buffer until the final chunk selects among all tokens.
The design and its reasons: docs/design.md, "Token-selective propagation".

Two pieces, both per step and both driven by the scheduler's
:class:`~vllm_fastkv.retention.RetentionStepPlan`:

* :func:`build_late_batch` (called by the attention metadata builder, on the host, before
  the forward) lays out the shortened batch of the later layers: its attention metadata
  (propagated rows read their ``P`` slots from ``S_p`` on), its slot mapping, and which
  tokens of the step it keeps;
* :class:`PropagatingForward` replaces the model's ``forward``: steps without
  propagation call the original (compiled, CUDA-graphed) forward; others run the
  decoder-layer loop themselves, eagerly, swapping the later layers' metadata into
  vLLM's forward context.

Supported: the Llama, Mistral, Qwen2 and Qwen3 families (one decoder-layer loop of
``layer(positions, hidden_states, residual)``); other models keep retention alone.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_fastkv import kernels
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.retention import PromptPropagation

logger = init_logger(f"vllm.{__name__}")

#: ``architectures`` entries whose decoder-layer loop :class:`PropagatingForward` runs.
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)

#: Attribute of a built attention metadata object holding the step's :class:`LateBatch`.
PROPAGATION_ATTR = "fastkv_propagation"


@dataclass
class PropagatedRow:
    """One prompt that propagates in this step, in the coordinates of both batches."""

    plan: PromptPropagation
    prompt_len: int
    row: int  # batch row in the step
    late_row: int  # batch row in the later layers' batch
    token_start: int  # first token of the row in the step's batch
    token_end: int  # one past its last
    late_start: int  # first of its ``P`` tokens in the later layers' batch


@dataclass
class LateBatch:
    """The later layers' batch of a step with propagation (see :func:`build_late_batch`).

    ``metadata`` is the attention metadata built for it (its own compression batch
    attached), ``slot_mapping`` its cache slots. ``keep_src``/``keep_dst``: tokens that
    pass through unchanged, as indices into the step's and the late batch's tokens.
    ``stash``: ``(token_start, count, buffer_row)`` of non-final chunks.
    """

    metadata: Any
    slot_mapping: torch.Tensor
    num_tokens: int
    keep_src: torch.Tensor
    keep_dst: torch.Tensor
    propagated: list[PropagatedRow]
    stash: list[tuple[int, int, int]]


@dataclass
class LateLayout:
    """Host-side layout of the later layers' batch, before its metadata is built."""

    common: CommonAttentionMetadata
    starts: list[int]  # per late row: the first slot its attention reads
    packed: list[int]  # per late row: its packed low-bit pages
    pack: list[tuple[int, int]]  # (late row, page) of pages packed in this step
    compress: list[tuple[int, int, int, int, int]]  # (late row, scored length, start, kept,
    # pages to pack)
    propagated: list[PropagatedRow]
    stash: list[tuple[int, int, int]]
    keep_src: torch.Tensor
    keep_dst: torch.Tensor


def late_layout(common: CommonAttentionMetadata, step: Any, block_size: int) -> LateLayout:
    """Lay out the later layers' batch of ``step`` (a ``StepRows``) from the step's metadata.

    Rows keep their order. A propagated row becomes ``P`` query tokens whose cache slots
    are ``[S_p, S_p + P)`` (``seq_len = S_p + P``, shifted by ``S_p`` like a compressed
    row, so attention reads exactly them); a stashed row (non-final chunk) is dropped;
    every other row is copied as is. Late-layer compression of a propagated row scores
    its ``P`` tokens and keeps ``T - S`` of them at ``[S, T)``, i.e. from ``S - S_p`` in
    the shifted view.
    """
    plan = step.plan
    query_start = common.query_start_loc_cpu.tolist()
    device = common.block_table_tensor.device
    rows, starts, packed, late_query_start, compress = [], [], [], [0], []
    pack: list[tuple[int, int]] = []
    seq_lens_host: dict[int, int] = {}
    keep_src: list[int] = []
    keep_dst: list[int] = []
    propagated: list[PropagatedRow] = []
    stash: list[tuple[int, int, int]] = []
    for row in range(common.num_reqs):
        begin, end = query_start[row], query_start[row + 1]
        req_id = step.req_ids[row] if row < len(step.req_ids) else None
        if req_id in plan.stash:
            chunk_start, offset = plan.stash[req_id]
            stash.append((begin, end - begin, offset + chunk_start))
            continue
        if end == begin:
            continue  # padding row
        late_row, late_begin = len(rows), late_query_start[-1]
        rows.append(row)
        retained = plan.compress.get(req_id)
        propagation = plan.propagate.get(req_id)
        if propagation is not None:
            count = propagation.count
            propagated.append(PropagatedRow(
                propagation, retained.prompt_len, row, late_row, begin, end, late_begin
            ))  # fmt: skip
            starts.append(propagation.start)
            packed.append(0)
            seq_lens_host[late_row] = propagation.start + count
            compress.append((late_row, count, retained.start - propagation.start,
                             retained.kept, retained.packed_pages))  # fmt: skip
        else:
            count = end - begin
            keep_src.extend(range(begin, end))
            keep_dst.extend(range(late_begin, late_begin + count))
            starts.append(plan.starts.get(req_id, 0))
            packed.append(plan.packed.get(req_id, 0))
            if req_id in plan.pack:
                pack.append((late_row, plan.pack[req_id][0]))
            if retained is not None:
                compress.append((late_row, retained.prompt_len, retained.start,
                                 retained.kept, retained.packed_pages))  # fmt: skip
        late_query_start.append(late_begin + count)

    row_index = torch.tensor(rows, dtype=torch.long)

    def take_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
        # Runners keep some per-row tensors on the host, others on the device.
        if tensor is None:
            return None
        return tensor.index_select(0, row_index.to(tensor.device, non_blocking=True))

    block_table = take_rows(common.block_table_tensor)
    seq_lens = take_rows(common.seq_lens)
    upper_bound = take_rows(common.seq_lens_cpu_upper_bound)
    for late_row, seq_len in seq_lens_host.items():
        seq_lens[late_row] = seq_len
        if upper_bound is not None:
            upper_bound[late_row] = seq_len
    num_tokens = late_query_start[-1]
    query_start_cpu = torch.tensor(late_query_start, dtype=torch.int32)
    keep_src_t = torch.tensor(keep_src, dtype=torch.long).to(device, non_blocking=True)
    keep_dst_t = torch.tensor(keep_dst, dtype=torch.long).to(device, non_blocking=True)
    slot_mapping = torch.empty(num_tokens, dtype=common.slot_mapping.dtype, device=device)
    slot_mapping[keep_dst_t] = common.slot_mapping[keep_src_t]
    for row in propagated:
        logical = row.plan.start + torch.arange(row.plan.count, device=device)
        blocks = block_table[row.late_row, logical // block_size].to(slot_mapping.dtype)
        slot_mapping[row.late_start : row.late_start + row.plan.count] = (
            blocks * block_size + logical % block_size
        )
    query_lens = [b - a for a, b in zip(late_query_start, late_query_start[1:])]
    late = dataclasses.replace(
        common,
        query_start_loc=query_start_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=query_start_cpu,
        seq_lens=seq_lens,
        num_reqs=len(rows),
        num_actual_tokens=num_tokens,
        max_query_len=max(query_lens, default=0),
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        logits_indices_padded=None,
        num_logits_indices=None,
        positions=None,
        is_prefilling=take_rows(common.is_prefilling),
        seq_lens_cpu_upper_bound=upper_bound,
        _seq_lens_cpu=None,
        _num_computed_tokens_cpu=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    return LateLayout(late, starts, packed, pack, compress, propagated, stash, keep_src_t,
                      keep_dst_t)  # fmt: skip


class PropagatingForward:
    """The ``forward`` of a ``*ForCausalLM`` model with token-selective propagation.

    Installed on the model instance (the runner calls ``model(...)``, which reaches it);
    ``original`` is the model's own bound ``forward``. Steps without propagation, dummy
    and profiling runs, and CUDA-graph captures take ``original``.
    """

    def __init__(
        self, model: nn.Module, settings: FastKVConfig, buffer_tokens: int, vllm_config: Any
    ) -> None:
        self.model = model
        self.original = model.forward
        self.backbone = model.model
        self.tsp_layer = settings.tsp_layer
        self.window = settings.window
        self.layer_names = [layer.self_attn.attn.layer_name for layer in self.backbone.layers]
        weight = self.backbone.embed_tokens.weight  # [vocab (shard), hidden]
        # Allocated with the model, before vLLM measures free memory for the KV pool.
        self.buffer = torch.empty(buffer_tokens, weight.shape[1], dtype=weight.dtype,
                                  device=weight.device)
        self.ir_priority = eager_ir_priority(vllm_config)

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        late = None
        if is_forward_context_available():
            context = get_forward_context()
            metadata = context.attn_metadata
            if isinstance(metadata, dict) and metadata:
                late = getattr(metadata.get(self.layer_names[0]), PROPAGATION_ATTR, None)
        if late is None:
            return self.original(input_ids, positions, intermediate_tensors, inputs_embeds,
                                 **kwargs)
        with self.ir_priority.set_priority():
            return self._propagate(context, late, input_ids, positions, inputs_embeds)

    @torch.inference_mode()
    def _propagate(self, context, late: LateBatch, input_ids, positions, inputs_embeds):
        from vllm_fastkv.retention_metadata import COMPRESSION_ATTR

        backbone = self.backbone
        hidden = backbone.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in backbone.layers[: self.tsp_layer + 1]:
            hidden, residual = layer(positions, hidden, residual)
        # A decoder layer given ``residual=None`` starts from ``residual = hidden``, so the
        # later layers can take layer ``tsp_layer``'s output as one tensor.
        hidden = hidden + residual
        for begin, count, buffer_row in late.stash:
            self.buffer[buffer_row : buffer_row + count] = hidden[begin : begin + count]

        late_hidden = hidden.new_empty(late.num_tokens, hidden.shape[1])
        late_positions = positions.new_empty(late.num_tokens)
        late_hidden[late.keep_dst] = hidden[late.keep_src]
        late_positions[late.keep_dst] = positions[late.keep_src]
        if late.propagated:
            batch = getattr(context.attn_metadata[self.layer_names[self.tsp_layer]],
                            COMPRESSION_ATTR)
            selected = self._select(batch, late.propagated)
            for row, indices in zip(late.propagated, selected):
                span = slice(row.late_start, row.late_start + row.plan.count)
                late_hidden[span] = self._gather(hidden, row, indices)
                late_positions[span] = indices.to(positions.dtype)

        out = hidden.new_zeros(hidden.shape)
        if late.num_tokens == 0:
            return out  # only non-final chunks: nothing past tsp_layer, nothing sampled
        metadata, slots = context.attn_metadata, context.slot_mapping
        context.attn_metadata = dict.fromkeys(metadata, late.metadata)
        context.slot_mapping = dict.fromkeys(slots, late.slot_mapping)
        try:
            residual = None
            for layer in backbone.layers[self.tsp_layer + 1 :]:
                late_hidden, residual = layer(late_positions, late_hidden, residual)
        finally:
            context.attn_metadata, context.slot_mapping = metadata, slots
        late_hidden, _ = backbone.norm(late_hidden, residual)

        # Full-size output: only the rows the runner samples from need values (a
        # propagated prompt's last token is in its window, so always selected).
        out[late.keep_src] = late_hidden[late.keep_dst]
        for row in late.propagated:
            out[row.token_end - 1] = late_hidden[row.late_start + row.plan.count - 1]
        return out

    def _select(self, batch, rows: list[PropagatedRow]) -> list[torch.Tensor]:
        """``P`` sorted prompt positions per row from layer ``tsp_layer``'s scores."""
        from vllm.distributed import (
            get_tensor_model_parallel_world_size,
            tensor_model_parallel_all_reduce,
        )

        position = {row: i for i, row in enumerate(batch.rows)}
        index = torch.tensor([position[row.row] for row in rows], device=batch.scores.device)
        scores = batch.scores.index_select(0, index).sum(dim=1, keepdim=True)
        if get_tensor_model_parallel_world_size() > 1:
            # Each rank scores its own KV heads; all must pick the same tokens.
            scores = tensor_model_parallel_all_reduce(scores)
        prompt_lens = [row.prompt_len for row in rows]
        counts = [row.plan.count for row in rows]
        if scores.is_cuda:
            indices = kernels.select_propagated(scores, prompt_lens, counts, self.window)
        else:
            indices = kernels.select_propagated_ref(
                scores, torch.tensor(prompt_lens), torch.tensor(counts), self.window
            )
        return [indices[i, : row.plan.count] for i, row in enumerate(rows)]

    def _gather(self, hidden: torch.Tensor, row: PropagatedRow, indices: torch.Tensor):
        """Hidden states of the selected positions: this step's chunk or the buffer."""
        chunk_start = row.plan.chunk_start
        from_step = hidden[(row.token_start + indices - chunk_start).clamp_(min=row.token_start)]
        if row.plan.buffer_offset < 0:
            return from_step
        from_buffer = self.buffer[(row.plan.buffer_offset + indices).clamp_(
            max=row.plan.buffer_offset + max(chunk_start - 1, 0))]
        return torch.where((indices >= chunk_start)[:, None], from_step, from_buffer)


def eager_ir_priority(vllm_config: Any) -> Any:
    """vLLM IR op priorities (RMSNorm and its fused residual add) for the eager steps.

    Under torch.compile vLLM dispatches these ops to their ``native`` torch versions so
    that inductor can fuse them; run eagerly, those are half a dozen unfused kernels per
    norm (measured: ~45 ms per 16K-token chunk of a Llama-3.1-8B shape on an H200). The
    propagating steps therefore put vLLM's own kernels (``vllm_c``) first, as vLLM does
    itself when it does not compile; unsupported providers (on CPUs) are skipped.
    """
    from vllm.config.kernel import IrOpPriorityConfig

    configured = vllm_config.kernel_config.ir_op_priority
    return IrOpPriorityConfig(**{
        field.name: [
            *(p for p in getattr(configured, field.name) if p not in ("vllm_c", "native")),
            "vllm_c",
            "native",
        ]
        for field in dataclasses.fields(configured)
    })  # fmt: skip


def install(model: nn.Module, vllm_config: Any) -> None:
    """Give a freshly loaded model token-selective propagation if its settings ask for it."""
    from vllm_fastkv.engine_config import engine_fastkv_config
    from vllm_fastkv.registration import is_fastkv_selected

    if not is_fastkv_selected(vllm_config):
        return
    settings = engine_fastkv_config(vllm_config)
    if not settings.propagates:
        return
    architectures = set(getattr(vllm_config.model_config.hf_config, "architectures", None) or ())
    if not architectures & SUPPORTED_ARCHITECTURES:
        return
    buffer_tokens = settings.tsp_buffer_tokens
    if buffer_tokens is None:
        buffer_tokens = vllm_config.model_config.max_model_len
    model.forward = PropagatingForward(model, settings, buffer_tokens, vllm_config)
    logger.info(
        "FastKV token-selective propagation: after layer %d, %s of each prompt; "
        "buffer for chunked prompts: %d tokens (%.0f MiB)",
        settings.tsp_layer, f"{settings.tsp_rate:.0%}" if settings.mode == "proportional"
        else f"{settings.tsp_len} tokens", buffer_tokens,
        model.forward.buffer.numel() * model.forward.buffer.element_size() / 2**20,
    )


@functools.cache
def install_model_hook() -> None:
    """Wrap vLLM's model loading so every loaded model passes through :func:`install`."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    load_model = BaseModelLoader.load_model

    @functools.wraps(load_model)
    def load_with_propagation(self, vllm_config, model_config, prefix: str = ""):
        model = load_model(self, vllm_config, model_config, prefix)
        if not prefix:  # the target model, not a drafter
            install(model, vllm_config)
        return model

    BaseModelLoader.load_model = load_with_propagation
