"""KV retention planning: which prompt KV a request keeps, in whole blocks.

Shared by the scheduler (which frees blocks) and the workers (which compact the cache and
attend over what is left), so both sides derive the same layout from the same numbers.

Layout (docs/design.md, "tail-aligned compaction"): a prompt of ``T`` tokens with budget
``B`` keeps its selected entries in the logical slots ``[S, T)``, where
``S = floor((T - B) / block_size) * block_size``. Each layer and KV head keeps
``T - S`` entries (the budget rounded up to whole blocks, ``B <= T - S < B + block_size``),
the leading ``S / block_size`` blocks are dead for every layer and go back to vLLM's
block pool, and new tokens keep their logical slots ``T, T + 1, ...`` so positions,
slot mappings and vLLM's token accounting never change.

Low-bit KV (``kv_bits`` 4 or 2) then folds the kept slots into packed pages: from ``S``
on, every ``R`` consecutive blocks (``page_tokens = R * block_size`` slots) whose slots all
lie before the last ``kv_residual`` prompt tokens become one page, quantised into the
first block of the ``R``; the other ``R - 1`` blocks go back to the pool too. ``R`` comes
from the page layout (:mod:`vllm_fastkv.packed_layout`), passed in as
``page_tokens``.

Mixed precision (``evicted_bits`` 4 or 2, MiKV's idea): nothing is freed before ``S``;
each layer and KV head keeps its selected entries at ``[S, T)`` and what selection
evicts at ``[0, S)`` (a selected entry before ``S`` trades slots with an evicted one at
or after it), and every whole page of ``[0, S)`` is packed at ``evicted_bits``. The
selected entries and the generated tokens stay at 16 bits, so no page is packed while
decoding.

Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_fastkv.config import ADDITIONAL_CONFIG_KEY, FastKVConfig, FastKVConfigError

#: The key of a request's FastKV overrides in ``SamplingParams.extra_args``.
REQUEST_OVERRIDES_KEY = ADDITIONAL_CONFIG_KEY

#: Per-request settings a client may override. The rest belong to the deployment: the
#: scoring settings are shared by every prompt a step compresses in one batch.
REQUEST_OVERRIDABLE = frozenset({"enabled", "retain_rate", "mode", "max_capacity_prompt"})


@dataclass(frozen=True)
class PromptRetention:
    """How one request's prompt KV is compressed: keep slots ``[start, prompt_len)``, the
    first ``packed_pages * page_tokens`` of them packed to low-bit pages.

    ``evicted``: with mixed precision, the slots ``[start, start + evicted)`` hold the
    entries selection evicts (``start`` is then 0), the selected ones follow them."""

    prompt_len: int
    start: int
    packed_pages: int = 0
    evicted: int = 0

    @property
    def kept(self) -> int:
        """Entries selected per layer and KV head (the block-rounded budget ``B'``)."""
        return self.prompt_len - self.start - self.evicted


@dataclass(frozen=True)
class PromptPropagation:
    """Token-selective propagation of a prompt that completes in this step.

    Layers after ``tsp_layer`` run over ``count`` selected tokens only (``P``), written to
    the logical slots ``[start, start + count)`` of those layers' caches, where
    ``start = floor((T - P) / block_size) * block_size`` (``S_p``): contiguous slots, so
    varlen causal attention reads exactly them, and ``start <= S`` (the retention start)
    because ``P >= T - S``, so compaction then moves entries towards the tail only.

    ``chunk_start``: the first prompt token scheduled in this step; the hidden states of
    the tokens before it (earlier chunks) wait in the propagation buffer from
    ``buffer_offset`` on (``-1``: the prompt arrived in one step).
    """

    count: int
    start: int
    chunk_start: int = 0
    buffer_offset: int = -1


@dataclass
class RetentionStepPlan:
    """What one scheduler step asks of the workers; travels on ``SchedulerOutput``.

    ``compress``: requests whose prompt is complete after this step; each layer compacts
    their KV right after its attention (which still sees the whole prompt).
    ``starts``: requests compressed in an earlier step; attention reads their blocks
    from ``start`` on (the blocks before it may already belong to other requests).
    ``packed``: requests of ``starts`` whose first kept slots are packed pages (how many
    this step's attention reads).
    ``pack``: decoding requests that pack one more page after this step's attention, as
    ``(page index, the compression it extends)``: with this step's token their kept
    slots and generated tokens have grown by a page past ``kv_residual``.
    ``propagate``: the subset of ``compress`` that continues past ``tsp_layer`` with its
    selected tokens only.
    ``stash``: non-final prefill chunks of propagated prompts, as ``(chunk_start,
    buffer_offset)``: they run layers ``0..tsp_layer`` and leave their output hidden
    states at ``buffer_offset + chunk_start`` for the final chunk.
    """

    compress: dict[str, PromptRetention] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)
    packed: dict[str, int] = field(default_factory=dict)
    pack: dict[str, tuple[int, PromptRetention]] = field(default_factory=dict)
    propagate: dict[str, PromptPropagation] = field(default_factory=dict)
    stash: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.compress or self.starts or self.stash)

    @property
    def shortens(self) -> bool:
        """Whether layers after ``tsp_layer`` run over fewer tokens than this step has."""
        return bool(self.propagate or self.stash)


#: Attribute of vLLM's ``SchedulerOutput`` that carries the step plan to the workers.
STEP_PLAN_ATTR = "fastkv_retention"


def request_settings(
    engine: FastKVConfig, extra_args: Mapping[str, Any] | None
) -> FastKVConfig:
    """The engine settings with a request's ``extra_args["fastkv"]`` overrides applied.

    Raises :class:`~vllm_fastkv.config.FastKVConfigError` naming the offending field
    (``fastkv.retain_rate=...``) for unknown, non-overridable or invalid values.
    """
    overrides = (extra_args or {}).get(REQUEST_OVERRIDES_KEY)
    if overrides is None:
        return engine
    if not isinstance(overrides, Mapping):
        raise FastKVConfigError(
            f"Invalid FastKV setting: request {REQUEST_OVERRIDES_KEY} must be a JSON object, "
            f"got {type(overrides).__name__}"
        )
    fixed = sorted(set(overrides) & (set(FastKVConfig.model_fields) - REQUEST_OVERRIDABLE))
    if fixed:
        raise FastKVConfigError(
            f"Invalid FastKV setting {REQUEST_OVERRIDES_KEY}.{fixed[0]}: set per deployment, "
            f"not per request (per request: {', '.join(sorted(REQUEST_OVERRIDABLE))})"
        )
    return FastKVConfig.validated({**engine.model_dump(), **overrides})


def plan_retention(
    settings: FastKVConfig, prompt_len: int, block_size: int, page_tokens: int = 0
) -> PromptRetention | None:
    """The retention layout of a ``prompt_len``-token prompt, or None to keep it whole.

    A prompt is left alone when FastKV is disabled for it or when its budget is within
    one block of its length (nothing could be freed). With low-bit KV (``page_tokens``:
    slots per packed page, 0 without), the kept slots before the last ``kv_residual``
    prompt tokens are packed in whole pages; with mixed precision, the whole pages of
    the evicted entries.
    """
    if not settings.enabled or settings.retain_rate >= 1.0 and settings.mode == "proportional":
        return None
    budget = settings.retention_budget(prompt_len)
    start = (prompt_len - budget) // block_size * block_size
    if start <= 0:
        return None
    if settings.keeps_evicted:
        retained = PromptRetention(prompt_len=prompt_len, start=0, evicted=start)
    else:
        retained = PromptRetention(prompt_len=prompt_len, start=start)
    pages = pages_to_pack(settings, retained, prompt_len, page_tokens)
    return dataclasses.replace(retained, packed_pages=pages)


def pages_to_pack(settings: FastKVConfig, retained: PromptRetention, cached: int,
                  page_tokens: int) -> int:
    """Pages a compressed request's slots ``[start, cached)`` fill, less ``kv_residual``.

    The same rule as at compression (:func:`plan_retention`), applied as the request
    grows: generated tokens extend the kept slots, and every ``page_tokens`` of them past
    the residual make one more page. With mixed precision: the whole pages of the evicted
    slots, however long the request grows.
    """
    if not settings.quantizes or page_tokens <= 0:
        return 0
    if retained.evicted:
        return retained.evicted // page_tokens
    return max(cached - retained.start - settings.kv_residual, 0) // page_tokens


def plan_propagation(
    settings: FastKVConfig, retained: PromptRetention | None, block_size: int
) -> PromptPropagation | None:
    """How many tokens of a compressed prompt continue past ``tsp_layer``, or None for all.

    Only compressed prompts propagate (their layers after ``tsp_layer`` keep
    ``retained.kept`` entries, which must be among the ``P`` propagated tokens: a budget
    larger than ``P`` leaves the prompt on retention alone).
    """
    if retained is None or not settings.propagates:
        return None
    prompt_len = retained.prompt_len
    count = settings.propagation_budget(prompt_len)
    if count >= prompt_len or count < retained.kept:
        return None
    return PromptPropagation(count=count, start=(prompt_len - count) // block_size * block_size)
