"""Running totals of KV retention in a scheduler, logged like vLLM's own engine stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

#: Seconds between two summary lines (vLLM logs its engine stats every 10 s too).
LOG_INTERVAL_S = 10.0


@dataclass
class RetentionStats:
    """Prompts compressed, prompt tokens vs tokens kept, blocks returned to the pool."""

    prompts: int = 0
    prompt_tokens: int = 0
    kept_tokens: int = 0
    freed_blocks: int = 0
    free_seconds: float = 0.0
    _last_log: float = field(default_factory=time.monotonic)

    def observe_compression(self, prompt_len: int, kept: int, freed_blocks: int) -> None:
        self.prompts += 1
        self.prompt_tokens += prompt_len
        self.kept_tokens += kept
        self.freed_blocks += freed_blocks

    def observe_free_seconds(self, seconds: float) -> None:
        self.free_seconds += seconds
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            logger.info("%s", self.summary())

    def summary(self) -> str:
        share = self.kept_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return (
            f"FastKV retention: {self.prompts} prompts compressed, {self.kept_tokens}/"
            f"{self.prompt_tokens} prompt tokens kept per layer ({share:.1%}), "
            f"{self.freed_blocks} KV blocks returned to the pool"
        )
