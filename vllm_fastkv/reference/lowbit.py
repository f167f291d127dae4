"""Low-bit storage of a prefill's retained KV, on dense tensors: the oracle of packed KV.

vLLM keeps a layer's ``B'`` retained entries per KV head in logical slots ``[S, T)``
(rank ``r`` at slot ``S + r``) and packs the slots before the last ``kv_residual`` prompt
tokens in whole pages of ``page_tokens`` slots (:mod:`vllm_fastkv.retention`). In rank
terms: the first ``n * page_tokens`` ranks, ``n = (B' - kv_residual) // page_tokens``.
:func:`quantize_retained` replaces exactly those entries by their dequantised values,
grouped as the packed pages group them (keys: per channel over each cache block of
``block_size`` ranks; values: per rank over ``value_group`` channels), with the same
arithmetic (:func:`vllm_fastkv.reference.quantization.quantize_groups_ref`). Decoding on the
result (:func:`vllm_fastkv.reference.greedy_decode`) is what the engine computes.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_fastkv.reference.fastkv import PrefillResult
from vllm_fastkv.reference.quantization import dequantize_groups_ref, quantize_groups_ref


def quantize_retained(
    prefill: PrefillResult,
    *,
    bits: int,
    value_group: int,
    residual: int,
    block_size: int,
    page_tokens: int,
) -> PrefillResult:
    """``prefill`` with each layer's packed ranks stored at ``bits`` bits (see above)."""
    layers = []
    for layer in prefill.layers:
        kept = layer.keys.shape[1]
        packed = max(kept - residual, 0) // page_tokens * page_tokens
        keys, values = layer.keys.clone(), layer.values.clone()
        if packed:
            heads, _, dim = keys.shape
            group = min(value_group, dim)
            k = keys[:, :packed].reshape(heads, packed // block_size, block_size, dim)
            keys[:, :packed] = _round_trip(k, bits, dim=2).reshape(heads, packed, dim)
            v = values[:, :packed].reshape(heads, packed, dim // group, group)
            values[:, :packed] = _round_trip(v, bits, dim=3).reshape(heads, packed, dim)
        layers.append(dataclasses.replace(layer, keys=keys, values=values))
    return dataclasses.replace(prefill, layers=layers)


def _round_trip(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantise in groups along ``dim`` and back, in ``x``'s dtype."""
    return dequantize_groups_ref(*quantize_groups_ref(x, bits, dim)).to(x.dtype)
