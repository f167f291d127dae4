"""The window queries' softmax normalisers, taken from the prompt's own FlashAttention.

Window scoring needs every window query's log-sum-exp over the keys it sees before any
token's attention mass is known; computing it means reading the layer's keys once more
(the first of :func:`~vllm_fastkv.kernels.window_scores`' two key passes). In the step
that completes a prompt, vLLM's FlashAttention has just computed exactly these numbers
for the same queries, keys, scale and causal mask, and FlashAttention 2/3 produce them on
every call (``return_softmax_lse`` only decides whether they are returned). So while a
FASTKV layer compresses, :func:`capture_lse` has vLLM's FlashAttention call return them,
and scoring reads the keys once.

vLLM's FlashAttention backend calls the module-level ``flash_attn_varlen_func`` of
:mod:`vllm.v1.attention.backends.flash_attn`; :func:`install` wraps that name once. The
wrapper changes nothing unless a capture is armed, and then only for a call that did not
ask for the log-sum-exps itself (vLLM's cascade and context-parallel paths do, and keep
their results): the capture then stays empty and scoring runs both of its passes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

_WRAPPED_ATTR = "_fastkv_lse_capture"


@dataclass
class CapturedLse:
    """What one armed forward captured: FlashAttention's ``[num_heads, num_tokens]`` fp32
    natural-log log-sum-exps of its queries, or ``None`` if no call handed them over."""

    lse: torch.Tensor | None = None


_armed: CapturedLse | None = None


def _capturing(varlen: Callable[..., Any]) -> Callable[..., Any]:
    """``varlen`` returning its output as before, handing the log-sum-exps to the capture."""

    @functools.wraps(varlen)
    def flash_attn_varlen_func(*args: Any, **kwargs: Any) -> Any:
        capture = _armed
        if capture is None or kwargs.get("return_softmax_lse", False):
            return varlen(*args, **kwargs)
        out, capture.lse = varlen(*args, **(kwargs | {"return_softmax_lse": True}))
        return out

    setattr(flash_attn_varlen_func, _WRAPPED_ATTR, True)
    return flash_attn_varlen_func


def install() -> bool:
    """Wrap vLLM's FlashAttention entry point (once); ``False`` where it has none (CPUs)."""
    from vllm.v1.attention.backends import flash_attn

    varlen = getattr(flash_attn, "flash_attn_varlen_func", None)
    if varlen is None:
        return False
    if not getattr(varlen, _WRAPPED_ATTR, False):
        flash_attn.flash_attn_varlen_func = _capturing(varlen)
    return True


@contextmanager
def capture_lse() -> Iterator[CapturedLse]:
    """Arm the capture for the block's FlashAttention call."""
    global _armed
    captured = CapturedLse()
    previous, _armed = _armed, captured
    try:
        yield captured
    finally:
        _armed = previous

