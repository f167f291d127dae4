"""Low-bit storage of a retained KV cache, on dense tensors: the oracle of packed KV.

vLLM keeps a layer's ``B'`` retained entries per KV head in logical slots ``[S, T)``
(rank ``r`` at slot ``S + r``, generated tokens after them) and packs the slots before
the last ``kv_residual`` ones in whole pages of ``page_tokens`` slots
(:mod:`vllm_fastkv.retention`): at compression every page the prompt fills, then one more
page whenever decoding has grown the cache by another page. In rank terms: with ``n``
cached entries, the first ``(n - kv_residual) // page_tokens`` pages. :class:`LowBitStore`
replaces exactly those entries by their dequantised values, grouped as the packed pages
group them (keys: per channel over each cache block of ``block_size`` ranks; values: per
rank over ``value_group`` channels), with the same arithmetic
(:func:`vllm_fastkv.reference.quantization.quantize_groups_ref`). Decoding with it
(:func:`vllm_fastkv.reference.greedy_decode` with ``kv_store``) is what the engine does.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_fastkv.reference.fastkv import PrefillResult
from vllm_fastkv.reference.quantization import dequantize_groups_ref, quantize_groups_ref


class LowBitStore:
    """Packs each layer's cache page by page as it grows (see the module docstring).

    Call it with a layer's ``[heads, n, dim]`` keys and values before each decode step
    (and once after prefill, :meth:`prefill`); pages already stored are left alone, as in
    the engine, where a page is quantised once.
    """

    def __init__(
        self, *, bits: int, value_group: int, residual: int, block_size: int, page_tokens: int
    ) -> None:
        self.bits = bits
        self.value_group = value_group
        self.residual = residual
        self.block_size = block_size
        self.page_tokens = page_tokens
        self._stored: dict[int, int] = {}  # layer -> ranks stored at low bits

    def __call__(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        due = max(keys.shape[1] - self.residual, 0) // self.page_tokens * self.page_tokens
        done = self._stored.get(layer, 0)
        if due <= done:
            return keys, values
        keys, values = keys.clone(), values.clone()
        heads, _, dim = keys.shape
        group = min(self.value_group, dim)
        span = slice(done, due)
        k = keys[:, span].reshape(heads, (due - done) // self.block_size, self.block_size, dim)
        keys[:, span] = _round_trip(k, self.bits, dim=2).reshape(heads, due - done, dim)
        v = values[:, span].reshape(heads, due - done, dim // group, group)
        values[:, span] = _round_trip(v, self.bits, dim=3).reshape(heads, due - done, dim)
        self._stored[layer] = due
        return keys, values

    def prefill(self, prefill: PrefillResult) -> PrefillResult:
        """``prefill`` with the pages its retained entries fill stored at low bits."""
        layers = [
            dataclasses.replace(layer, keys=keys, values=values)
            for index, layer in enumerate(prefill.layers)
            for keys, values in [self(index, layer.keys, layer.values)]
        ]
        return dataclasses.replace(prefill, layers=layers)


def _round_trip(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantise in groups along ``dim`` and back, in ``x``'s dtype."""
    return dequantize_groups_ref(*quantize_groups_ref(x, bits, dim)).to(x.dtype)
