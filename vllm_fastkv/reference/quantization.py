"""KIVI-style asymmetric group quantisation on dense tensors (torch only).

The arithmetic every low-bit path shares: the packed-page kernels
(:mod:`vllm_fastkv.kernels.quantization`) and their oracles quantise with it, and
:mod:`vllm_fastkv.reference.lowbit` stores a prefill's retained KV with it.
"""

from __future__ import annotations

import torch


def quantize_groups_ref(
    x: torch.Tensor, bits: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantisation of ``x`` in groups along ``dim``.

    Returns ``(codes, scale, minimum)``: int32 codes in ``[0, 2^bits)`` shaped like ``x``,
    and fp16 ``scale = (max - min) / (2^bits - 1)`` and ``min`` with ``dim`` reduced (kept
    as size 1). Both are clamped to the fp16 range before rounding to it; a group whose
    fp16 scale is 0 (constant, or too narrow for fp16) gets codes 0.
    """
    levels = 2**bits - 1
    x = x.float()
    fp16_max = torch.finfo(torch.float16).max
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low) / levels).clamp(max=fp16_max).half()
    minimum = low.clamp(-fp16_max, fp16_max).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.floor((x - minimum.float()) / safe + 0.5).clamp(0, levels)
    codes = torch.where(scale == 0, torch.zeros_like(codes), codes)
    return codes.to(torch.int32), scale, minimum


def dequantize_groups_ref(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    """fp32 ``codes * scale + min`` (the inverse of :func:`quantize_groups_ref`)."""
    return codes.float() * scale.float() + minimum.float()
