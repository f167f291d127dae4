"""KV retention totals (scheduler) and compression times (workers): Prometheus metrics.

The scheduler runs in vLLM's engine-core process, while ``/metrics`` is served by the API
server process. vLLM 0.26 ships engine-core numbers to the API server only through its
fixed ``SchedulerStats`` schema, so these metrics use Prometheus' multiprocess mode:
when ``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM sets it itself for ``--api-server-count >
1``; the Docker entrypoint and Helm chart of this project set it always), every process
writes its samples to that directory and ``/metrics`` merges them. Without it the
counters still count and the log line below still reports them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Histogram
from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

#: Seconds between two summary lines (vLLM logs its engine stats every 10 s too).
LOG_INTERVAL_S = 10.0

_PROMPTS = Counter(
    "vllm:fastkv_compressed_prompts", "Prompts whose KV cache FastKV compressed."
)
_PROMPT_TOKENS = Counter(
    "vllm:fastkv_prompt_tokens", "Prompt tokens of the prompts FastKV compressed."
)
_KEPT_TOKENS = Counter(
    "vllm:fastkv_retained_tokens",
    "KV entries kept per layer and KV head for the prompts FastKV compressed.",
)
_FREED_BLOCKS = Counter(
    "vllm:fastkv_freed_blocks", "KV cache blocks FastKV returned to vLLM's pool."
)
_PACKED_PAGES = Counter(
    "vllm:fastkv_packed_pages",
    "Low-bit KV pages FastKV packed (each frees all but one of its blocks).",
)
_PROPAGATED_PROMPTS = Counter(
    "vllm:fastkv_propagated_prompts",
    "Prompts whose later layers ran over the tokens FastKV's token-selective propagation kept.",
)
#: Observed by the workers (same process as the scheduler with one GPU or on CPUs).
COMPRESSION_SECONDS = Histogram(
    "vllm:fastkv_compression_seconds",
    "Device time of FastKV's scoring, selection and compaction in one engine step, all layers.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


@dataclass
class RetentionStats:
    """Prompts compressed, prompt tokens vs tokens kept, low-bit pages packed, blocks
    returned to the pool."""

    prompts: int = 0
    prompt_tokens: int = 0
    kept_tokens: int = 0
    freed_blocks: int = 0
    packed_pages: int = 0
    propagated: int = 0
    _last_log: float = field(default_factory=time.monotonic)

    def observe_compression(
        self, prompt_len: int, kept: int, freed_blocks: int, packed_pages: int = 0
    ) -> None:
        self.prompts += 1
        self.prompt_tokens += prompt_len
        self.kept_tokens += kept
        _PROMPTS.inc()
        _PROMPT_TOKENS.inc(prompt_len)
        _KEPT_TOKENS.inc(kept)
        self._observe_pages(packed_pages, freed_blocks)

    def observe_decode_page(self, freed_blocks: int) -> None:
        """One page packed in a decode step."""
        self._observe_pages(1, freed_blocks)

    def _observe_pages(self, pages: int, freed_blocks: int) -> None:
        self.packed_pages += pages
        self.freed_blocks += freed_blocks
        _PACKED_PAGES.inc(pages)
        _FREED_BLOCKS.inc(freed_blocks)

    def observe_propagation(self) -> None:
        self.propagated += 1
        _PROPAGATED_PROMPTS.inc()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info("%s", self.summary())

    def summary(self) -> str:
        share = self.kept_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return (
            f"FastKV retention: {self.prompts} prompts compressed, {self.kept_tokens}/"
            f"{self.prompt_tokens} prompt tokens kept per layer ({share:.1%}), "
            f"{self.packed_pages} low-bit pages packed, "
            f"{self.freed_blocks} KV blocks returned to the pool, "
            f"{self.propagated} prompts propagated"
        )


class CompressionTimer:
    """Time spent compressing in one step, all layers: CUDA events on GPUs (read once they
    have completed, never waited for), the wall clock on CPUs."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_seconds = 0.0

    @contextmanager
    def span(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._host_seconds += time.perf_counter() - began

    @property
    def used(self) -> bool:
        return bool(self._events) or self._host_seconds > 0

    def ready(self) -> bool:
        return all(end.query() for _, end in self._events)

    def seconds(self) -> float:
        """Total; call only once :meth:`ready`."""
        device = sum(start.elapsed_time(end) for start, end in self._events) / 1000
        return self._host_seconds + device
