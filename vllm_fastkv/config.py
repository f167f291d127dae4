"""FastKV settings: one pydantic model, validated once at engine start-up.

Settings come from, in increasing precedence:
1. the defaults below (the paper's reference-script defaults),
2. environment variables ``VLLM_FASTKV_<FIELD>`` (container deployments set knobs
   through the environment rather than through the command line),
3. ``--additional-config '{"fastkv": {...}}'`` (``additional_config`` in ``LLM(...)``).

Every error names the offending field, so a typo or an out-of-range value stops
start-up with one readable line instead of an engine traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_fastkv.packed_layout import codes_per_word
from vllm_fastkv.reference.scoring import token_budget

#: Key of the FastKV section inside vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "fastkv"
#: Prefix of the environment variables that set FastKV fields.
ENV_PREFIX = "VLLM_FASTKV_"


class FastKVConfigError(ValueError):
    """A FastKV setting is invalid; the message names the field and the reason."""


class FastKVConfig(BaseModel):
    """FastKV knobs (see docs in README.md, "Configuration").

    ``tsp_layer`` defaults to ``None``, meaning "the middle of the stack"
    (``num_layers // 2 - 1``): 15 for Llama-3.1-8B's 32 layers, which is the
    paper's setting, and still valid for models of any depth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    enabled: bool = Field(
        default=True,
        description="Master switch; false makes FASTKV a plain full-KV attention backend.",
    )
    tsp_layer: int | None = Field(
        default=None,
        ge=0,
        description="Layer after which only the selected tokens propagate (None: middle layer).",
    )
    tsp_rate: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="Fraction of prompt tokens propagated past tsp_layer (1.0 disables TSP).",
    )
    retain_rate: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Fraction of prompt KV entries kept per layer and KV head (1.0 keeps all).",
    )
    window: int = Field(
        default=8, ge=1, description="Observation window: the last prompt tokens that score."
    )
    pool_kernel: int = Field(
        default=7, ge=1, description="1-D pooling kernel size over token scores (odd)."
    )
    pooling: Literal["avg", "max"] = Field(
        default="avg", description="Pooling of token scores: avg (LongBench eval) or max."
    )
    mode: Literal["proportional", "constant"] = Field(
        default="proportional",
        description="proportional: budgets are rates of the prompt; constant: fixed sizes.",
    )
    max_capacity_prompt: int = Field(
        default=512, ge=1, description="Constant mode: KV entries kept per layer and head."
    )
    tsp_len: int = Field(
        default=2048, ge=1, description="Constant mode: tokens propagated past tsp_layer."
    )
    tsp_buffer_tokens: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Chunked prefill with TSP: tokens of layer-tsp_layer hidden states held for "
            "prompts still arriving in chunks (None: max_model_len; 0: TSP only for "
            "prompts prefilled in one step)."
        ),
    )
    kv_bits: Literal[16, 4, 2] = Field(
        default=16,
        description=(
            "Bits per stored element of the retained prompt KV: 16 keeps it as is; 4 or 2 "
            "packs it KIVI-style (keys per channel, values per token) into fewer cache "
            "blocks, which go back to vLLM's pool."
        ),
    )
    kv_group_size: int = Field(
        default=32,
        ge=1,
        description="Low-bit KV: value channels per quantisation group (keys: one block).",
    )
    kv_residual: int = Field(
        default=128,
        ge=0,
        description="Low-bit KV: a request's last tokens always kept in full precision.",
    )
    evicted_bits: Literal[0, 4, 2] = Field(
        default=0,
        description=(
            "Mixed precision (MiKV): the prompt KV entries retention would evict are kept "
            "at 4 or 2 bits in packed pages instead of dropped, the selected ones stay at "
            "16 bits; 0 drops them. Needs kv_bits 16 and every layer's KV of the whole "
            "prompt (tsp_rate 1.0)."
        ),
    )
    selection: Literal["scored", "recency"] = Field(
        default="scored",
        description=(
            "scored: FastKV's window-attention selection; recency: keep the last tokens "
            "of the budget and propagate all (an evaluation baseline)."
        ),
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> FastKVConfig:
        if self.pool_kernel % 2 == 0:
            raise ValueError(
                f"pool_kernel must be odd so pooling keeps the token count (got {self.pool_kernel})"
            )
        if self.evicted_bits and self.kv_bits < 16:
            raise ValueError(
                f"evicted_bits ({self.evicted_bits}) keeps the selected entries at 16 bits: "
                f"it needs kv_bits 16 (got {self.kv_bits})"
            )
        if self.evicted_bits and self.selection == "scored" and self.tsp_rate < 1.0:
            raise ValueError(
                f"evicted_bits ({self.evicted_bits}) needs the KV of every prompt token in "
                f"every layer: set tsp_rate 1.0 (got {self.tsp_rate})"
            )
        if self.packed_bits < 16 and self.kv_group_size % codes_per_word(self.packed_bits):
            raise ValueError(
                f"kv_group_size must be a multiple of {codes_per_word(self.packed_bits)} at "
                f"{self.packed_bits} bits, the codes of one packed word "
                f"(got {self.kv_group_size})"
            )
        if self.mode == "constant":
            for name in ("max_capacity_prompt", "tsp_len"):
                if getattr(self, name) <= self.window:
                    raise ValueError(
                        f"{name} must exceed window ({self.window}) in constant mode "
                        f"(got {getattr(self, name)})"
                    )
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_sources(
        cls,
        additional_config: Mapping[str, Any] | None,
        environ: Mapping[str, str] | None = None,
    ) -> FastKVConfig:
        """Merge defaults, ``VLLM_FASTKV_*`` variables and ``additional_config``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var, raw in environ.items():
            if not var.startswith(ENV_PREFIX):
                continue
            name = var[len(ENV_PREFIX) :].lower()
            if name not in cls.model_fields:
                raise FastKVConfigError(
                    f"Invalid FastKV setting: unknown environment variable {var} "
                    f"(known: {', '.join(ENV_PREFIX + f.upper() for f in cls.model_fields)})"
                )
            values[name] = _parse_env_value(raw)
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if isinstance(section, FastKVConfig):
            section = section.model_dump()
        if not isinstance(section, Mapping):
            raise FastKVConfigError(
                f"Invalid FastKV setting: additional_config.{ADDITIONAL_CONFIG_KEY} must be a "
                f"JSON object, got {type(section).__name__}"
            )
        values.update(section)
        return cls.validated(values)

    @classmethod
    def validated(cls, values: Mapping[str, Any], where: str = "fastkv") -> FastKVConfig:
        """Build from a mapping, turning pydantic's report into one FastKVConfigError."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise FastKVConfigError(_format_errors(exc, where)) from None

    def resolved_for_model(self, num_layers: int) -> FastKVConfig:
        """Check model-dependent fields and fill ``tsp_layer`` for a model of this depth."""
        tsp_layer = num_layers // 2 - 1 if self.tsp_layer is None else self.tsp_layer
        if not 0 <= tsp_layer < num_layers - 1:
            raise FastKVConfigError(
                f"Invalid FastKV setting fastkv.tsp_layer={self.tsp_layer}: the model has "
                f"{num_layers} layers, so tsp_layer must be in [0, {num_layers - 2}] "
                "(at least one layer must follow it)"
            )
        return self.model_copy(update={"tsp_layer": max(tsp_layer, 0)})

    # ---------------------------------------------------------------- budgets
    @property
    def compresses(self) -> bool:
        """Whether any mechanism changes the computation (else: plain full KV)."""
        return self.enabled and (
            self.retain_rate < 1.0 or self.tsp_rate < 1.0 or self.mode == "constant"
        )

    def retention_budget(self, prompt_len: int) -> int:
        """KV entries kept per layer and KV head for a prompt of ``prompt_len`` tokens."""
        if not self.enabled:
            return prompt_len
        return token_budget(
            prompt_len, mode=self.mode, rate=self.retain_rate,
            capacity=self.max_capacity_prompt, window=self.window,
        )  # fmt: skip

    @property
    def packed_bits(self) -> int:
        """Bits of the packed low-bit pages: ``kv_bits`` (the retained KV packed),
        ``evicted_bits`` (mixed precision: what retention evicts), 16 (no pages)."""
        if self.kv_bits < 16:
            return self.kv_bits
        return self.evicted_bits or 16

    @property
    def packed_bits_setting(self) -> str:
        """The setting that chose ``packed_bits``, as errors name it (``fastkv.kv_bits=2``)."""
        if self.kv_bits < 16:
            return f"fastkv.kv_bits={self.kv_bits}"
        return f"fastkv.evicted_bits={self.evicted_bits}"

    @property
    def quantizes(self) -> bool:
        """Whether prompt KV is packed to low-bit pages (``kv_bits`` or ``evicted_bits``)."""
        return self.enabled and self.packed_bits < 16

    @property
    def keeps_evicted(self) -> bool:
        """Mixed precision: what retention evicts stays, at ``evicted_bits`` bits."""
        return self.enabled and self.evicted_bits > 0

    @property
    def propagates(self) -> bool:
        """Whether token-selective propagation may shorten prompts past ``tsp_layer``."""
        return self.enabled and self.selection == "scored" and self.tsp_rate < 1.0

    def propagation_budget(self, prompt_len: int) -> int:
        """Tokens propagated past ``tsp_layer`` for a prompt of ``prompt_len`` tokens."""
        if not self.propagates:
            return prompt_len
        return token_budget(
            prompt_len, mode=self.mode, rate=self.tsp_rate,
            capacity=self.tsp_len, window=self.window,
        )  # fmt: skip


def _parse_env_value(raw: str) -> Any:
    """Env values are JSON when they parse as JSON (numbers, booleans), else strings."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _format_errors(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{where}.{loc}" if loc else where
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting (known: {', '.join(FastKVConfig.model_fields)})"
            parts.append(f"{field}: {msg}")
        else:
            parts.append(f"{field}={err.get('input')!r}: {msg}")
    return "Invalid FastKV setting " + "; ".join(parts)
