"""Per-request FastKV settings: ``"fastkv": {...}`` in an OpenAI request body.

Clients send ``extra_body={"fastkv": {"retain_rate": 0.2}}`` (or ``{"enabled": false}``)
with a completion or chat completion. The front end moves the object into the request's
``SamplingParams.extra_args["fastkv"]`` (where ``LLM.generate`` users put it directly)
and validates it against the engine's settings together with vLLM's own parameter
checks, so a bad value is a 400 naming the field and never reaches the engine. The
scheduler reads the validated overrides when it plans the request's retention.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_fastkv.config import FastKVConfig, FastKVConfigError
from vllm_fastkv.retention import REQUEST_OVERRIDES_KEY, request_settings


def check_request(engine_settings: FastKVConfig, extra_args: dict[str, Any] | None) -> None:
    """Raise vLLM's validation error (HTTP 400) if the request's overrides are invalid."""
    try:
        request_settings(engine_settings, extra_args)
    except FastKVConfigError as exc:
        raise VLLMValidationError(
            str(exc), parameter=REQUEST_OVERRIDES_KEY,
            value=(extra_args or {}).get(REQUEST_OVERRIDES_KEY),
        ) from None  # fmt: skip


def install_request_overrides() -> None:
    """Accept and validate ``fastkv`` request overrides in this front end (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.engine.input_processor import InputProcessor

    for request_cls in (ChatCompletionRequest, CompletionRequest):
        _carry_body_overrides(request_cls)
    if getattr(InputProcessor, "_fastkv_hooked", False):
        return
    validate = InputProcessor._validate_params

    @functools.wraps(validate)
    def _validate_params(self, params, supported_tasks) -> None:
        validate(self, params, supported_tasks)
        extra_args = getattr(params, "extra_args", None)
        if extra_args and REQUEST_OVERRIDES_KEY in extra_args:
            from vllm_fastkv.engine_config import engine_fastkv_config

            check_request(engine_fastkv_config(self.vllm_config), extra_args)

    InputProcessor._validate_params = _validate_params
    InputProcessor._fastkv_hooked = True


def _carry_body_overrides(request_cls: type) -> None:
    """Copy a request body's top-level ``fastkv`` object into its sampling params."""
    if getattr(request_cls, "_fastkv_hooked", False):
        return
    to_sampling_params = request_cls.to_sampling_params

    @functools.wraps(to_sampling_params)
    def wrapper(self, *args, **kwargs):
        params = to_sampling_params(self, *args, **kwargs)
        overrides = (self.model_extra or {}).get(REQUEST_OVERRIDES_KEY)
        if overrides is not None:
            params.extra_args = {**(params.extra_args or {}), REQUEST_OVERRIDES_KEY: overrides}
        return params

    request_cls.to_sampling_params = wrapper
    request_cls._fastkv_hooked = True
