"""The scheduler side of KV retention: plan compressions, free the dead leading blocks.

``FastKVScheduler`` / ``FastKVAsyncScheduler`` are vLLM's own schedulers (sync and async
scheduling) with three additions, installed by the plugin through
``scheduler_config.scheduler_cls`` when an engine compresses:

* chunk steering: a prompt's final prefill chunk is never shorter than the observation
  window, so the window's queries are all in the step that completes the prompt (through
  the scheduler's chunk-end hook, ``_mamba_block_aligned_split``, which vLLM calls for
  every prefill chunk when ``need_mamba_block_aligned_split`` is set);
* a per-step :class:`~vllm_fastkv.retention.RetentionStepPlan` on the ``SchedulerOutput``
  (which prompts complete now and are compressed by the workers; which requests attend
  from a start slot);
* after the step that compressed a prompt has run, its leading blocks are replaced by
  vLLM's null block and returned to the pool, exactly as vLLM's sliding-window manager
  frees out-of-window blocks, so the scheduler admits more requests by its ordinary
  free-block count;
* low-bit KV: a compressed prompt's kept slots folded into packed pages free all but the
  first block of every page too;
* token-selective propagation: which completing prompts continue past ``tsp_layer`` with
  their selected tokens only, and, for prompts prefilled in several chunks, a span of the
  workers' propagation buffer that holds the earlier chunks' hidden states (decided at
  the first chunk; a prompt that does not fit keeps retention alone).
"""

from __future__ import annotations

import dataclasses

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from vllm_fastkv.config import FastKVConfigError
from vllm_fastkv.engine_config import engine_fastkv_config
from vllm_fastkv.kv_quantization import engine_layout
from vllm_fastkv.retention import (
    STEP_PLAN_ATTR,
    PromptRetention,
    RetentionStepPlan,
    pages_to_pack,
    plan_propagation,
    plan_retention,
    request_settings,
)
from vllm_fastkv.retention_stats import RetentionStats

logger = init_logger(f"vllm.{__name__}")


class SpanAllocator:
    """First-fit allocation of token spans in the workers' propagation buffer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used: dict[int, int] = {}  # offset -> length

    def allocate(self, length: int) -> int | None:
        offset = 0
        for start, used in sorted(self._used.items()):
            if start - offset >= length:
                break
            offset = start + used
        if offset + length > self.capacity:
            return None
        self._used[offset] = length
        return offset

    def free(self, offset: int) -> None:
        del self._used[offset]

    @property
    def used(self) -> int:
        return sum(self._used.values())



class _RetentionSchedulerMixin(Scheduler):
    """KV retention on top of vLLM's scheduler (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fastkv = engine_fastkv_config(self.vllm_config)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            raise FastKVConfigError(
                "Invalid FastKV setting: KV retention needs a model whose layers all use "
                f"full attention in one KV cache group (got {len(groups)} groups)"
            )
        self.fastkv_block_size = groups[0].kv_cache_spec.block_size
        # Slots per packed low-bit page (0: KV is not packed); checked here, where the
        # cache's exact page format is known, so a format that cannot pack stops start-up.
        self.fastkv_page_tokens = 0
        self.fastkv_blocks_per_page = 1
        if self.fastkv.quantizes:
            layout = engine_layout(groups[0].kv_cache_spec, self.fastkv)
            self.fastkv_page_tokens = layout.page_tokens
            self.fastkv_blocks_per_page = layout.blocks_per_page
        # The observation window must arrive whole in the prompt's final step; a
        # one-token final chunk would also look like a decode step to the runners.
        self.fastkv_min_final_chunk = max(self.fastkv.window, 2)
        self.need_mamba_block_aligned_split = True
        self.fastkv_retained: dict[str, PromptRetention] = {}
        # The compression each retained request's layout started from; decode-time
        # packing replaces fastkv_retained's entry, this identifies the lineage.
        self.fastkv_origin: dict[str, PromptRetention] = {}
        self.fastkv_stats = RetentionStats()
        buffer_tokens = self.fastkv.tsp_buffer_tokens
        if buffer_tokens is None:
            buffer_tokens = self.vllm_config.model_config.max_model_len
        self.fastkv_buffer = SpanAllocator(buffer_tokens if self.fastkv.propagates else 0)
        # Prompts arriving in chunks, decided at their first chunk: buffer offset, or
        # None when they do not propagate.
        self.fastkv_stashing: dict[str, int | None] = {}

    # ------------------------------------------------------------- chunk steering
    def _mamba_block_aligned_split(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_local_computed_tokens: int = 0,
        num_external_computed_tokens: int = 0,
    ) -> int:
        start = (
            request.num_computed_tokens
            + num_new_local_computed_tokens
            + num_external_computed_tokens
        )
        prompt_len = request.num_prompt_tokens
        end = start + num_new_tokens
        last_chunk_start = prompt_len - self.fastkv_min_final_chunk
        if start < last_chunk_start < end < prompt_len:
            # Stop where the rest is exactly one window, not a sliver of it.
            return last_chunk_start - start
        if num_new_tokens == 1 and end < prompt_len and self.fastkv.propagates:
            # A one-token chunk next to decodes would look like a uniform decode batch and
            # replay a full CUDA graph, which never shortens the later layers.
            return 0
        return num_new_tokens

    # ------------------------------------------------------------- planning
    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        plan = RetentionStepPlan()
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            retained = self.fastkv_retained.get(req_id)
            if retained is not None:
                plan.starts[req_id] = retained.start
                if retained.packed_pages:
                    plan.packed[req_id] = retained.packed_pages
                if num_tokens == 1 and self.fastkv_page_tokens:
                    self._grow_pages(req_id, retained, plan)
                continue
            request = self.requests[req_id]
            computed = request.num_computed_tokens
            if computed >= request.num_prompt_tokens:
                continue
            if request.num_prompt_tokens > computed + num_tokens:
                offset = self._stash_offset(request)
                if offset is not None:
                    plan.stash[req_id] = (computed, offset)
                continue
            prompt_len = computed + num_tokens
            offset = self.fastkv_stashing.get(req_id)
            if num_tokens < min(self.fastkv.window, prompt_len):
                if offset is not None:
                    # Chunk steering guarantees a window-long final chunk; without it the
                    # stashed chunks' later layers could never be computed.
                    raise RuntimeError(
                        f"FastKV: the final chunk of request {req_id} has {num_tokens} "
                        f"tokens, fewer than the window ({self.fastkv.window})"
                    )
                # Only after preemption can a final chunk miss part of the window.
                logger.debug("FastKV: request %s keeps its full KV (short final chunk)", req_id)
                continue
            settings = self._request_settings(request)
            retained = plan_retention(settings, prompt_len, self.fastkv_block_size,
                                      self.fastkv_page_tokens)  # fmt: skip
            if retained is None:
                continue
            if retained.packed_pages and request.num_tokens > prompt_len:
                # A preempted request recomputing its generated tokens: more multi-token
                # chunks follow, and packed rows attend one query at a time.
                retained = dataclasses.replace(retained, packed_pages=0)
            plan.compress[req_id] = retained
            self.fastkv_retained[req_id] = retained
            self.fastkv_origin[req_id] = retained
            propagation = plan_propagation(settings, retained, self.fastkv_block_size)
            if propagation is not None and (computed == 0 or offset is not None):
                # A prompt whose earlier chunks ran every layer is not propagated.
                plan.propagate[req_id] = dataclasses.replace(
                    propagation, chunk_start=computed,
                    buffer_offset=-1 if computed == 0 else offset,
                )  # fmt: skip
        setattr(scheduler_output, STEP_PLAN_ATTR, plan)
        super()._update_after_schedule(scheduler_output)

    def _grow_pages(
        self, req_id: str, retained: PromptRetention, plan: RetentionStepPlan
    ) -> None:
        """Low-bit KV of a decoding request: when this step's token completes one more
        page past the residual, the step packs it after attending, and later steps read
        it packed (one per step; pages only ever extend the packed run). Packing at the
        end of the step that completes a page, not at the start of the next, lets the
        decode attention launch do it (a decode step has no launch of its own for it);
        every step's attention sees the same pages either way."""
        cached = self.requests[req_id].num_computed_tokens + 1
        due = pages_to_pack(self.fastkv, retained, cached, self.fastkv_page_tokens)
        if due <= retained.packed_pages:
            return
        plan.pack[req_id] = (retained.packed_pages, self.fastkv_origin[req_id])
        self.fastkv_retained[req_id] = dataclasses.replace(
            retained, packed_pages=retained.packed_pages + 1
        )

    def _stash_offset(self, request: Request) -> int | None:
        """The buffer offset of a chunked prompt's hidden states, decided at its first chunk."""
        req_id = request.request_id
        if req_id in self.fastkv_stashing:
            return self.fastkv_stashing[req_id]
        offset = None
        if request.num_computed_tokens == 0 and self.fastkv_buffer.capacity:
            settings = self._request_settings(request)
            prompt_len = request.num_prompt_tokens
            retained = plan_retention(settings, prompt_len, self.fastkv_block_size)
            if plan_propagation(settings, retained, self.fastkv_block_size) is not None:
                offset = self.fastkv_buffer.allocate(prompt_len)
                if offset is None:
                    logger.debug("FastKV: request %s is not propagated (buffer full)", req_id)
        self.fastkv_stashing[req_id] = offset
        return offset

    def _release_stash(self, req_id: str) -> None:
        offset = self.fastkv_stashing.pop(req_id, None)
        if offset is not None:
            self.fastkv_buffer.free(offset)

    def _request_settings(self, request: Request):
        try:
            params = request.sampling_params
            return request_settings(self.fastkv, params.extra_args if params else None)
        except FastKVConfigError as exc:
            # Front ends reject these (HTTP 400); a caller that bypasses them must not be
            # able to stop the engine, so the engine's own settings apply.
            logger.warning("FastKV: request %s: %s; using the engine settings",
                           request.request_id, exc)
            return self.fastkv

    # ------------------------------------------------------------- freeing
    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        plan: RetentionStepPlan | None = getattr(scheduler_output, STEP_PLAN_ATTR, None)
        if plan is not None and plan.compress:
            for req_id in plan.propagate:
                self.fastkv_stats.observe_propagation()
                if self.fastkv_origin.get(req_id) is plan.compress[req_id]:
                    self._release_stash(req_id)
            for req_id, retained in plan.compress.items():
                # The request may have finished or been preempted (its blocks are gone)
                # since this step was scheduled.
                if self.fastkv_origin.get(req_id) is retained:
                    self._free_dead_blocks(req_id, retained)
            self.fastkv_stats.maybe_log()
        if plan is not None:
            for req_id, (page, origin) in plan.pack.items():
                if self.fastkv_origin.get(req_id) is origin:
                    self._free_page_tail(req_id, origin, page)
        return outputs

    def _free_dead_blocks(self, req_id: str, retained: PromptRetention) -> None:
        """Return the blocks before ``start`` and, of every packed page, all blocks but
        its first to the pool."""
        ranges = [(0, retained.start // self.fastkv_block_size)] + [
            self._page_tail(retained, k) for k in range(retained.packed_pages)
        ]
        freed = self._free_ranges(req_id, ranges)
        self.fastkv_stats.observe_compression(retained.prompt_len, retained.kept, freed,
                                              retained.packed_pages)  # fmt: skip

    def _free_page_tail(self, req_id: str, retained: PromptRetention, page: int) -> None:
        """After a decode step packed page ``page``: its blocks but the first go back."""
        self.fastkv_stats.observe_decode_page(self._free_ranges(req_id, [
            self._page_tail(retained, page)
        ]))  # fmt: skip

    def _page_tail(self, retained: PromptRetention, page: int) -> tuple[int, int]:
        """Block indices of page ``page``'s blocks after its first."""
        first = retained.start // self.fastkv_block_size + page * self.fastkv_blocks_per_page
        return first + 1, first + self.fastkv_blocks_per_page

    def _free_ranges(self, req_id: str, ranges: list[tuple[int, int]]) -> int:
        """Null and free the request's blocks in ``ranges``; returns how many were freed."""
        free_before = self.kv_cache_manager.block_pool.get_num_free_blocks()
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            for begin, end in ranges:
                manager._remove_blocks_in_range(req_id, begin, end)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() - free_before

    def _free_request_blocks(self, request: Request) -> None:
        # Finished or preempted: a preempted request is recomputed from scratch and
        # planned again when its prompt completes.
        self.fastkv_retained.pop(request.request_id, None)
        self.fastkv_origin.pop(request.request_id, None)
        self._release_stash(request.request_id)
        super()._free_request_blocks(request)


class FastKVScheduler(_RetentionSchedulerMixin, Scheduler):
    """vLLM's scheduler with FastKV KV retention."""


class FastKVAsyncScheduler(_RetentionSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with FastKV KV retention."""
