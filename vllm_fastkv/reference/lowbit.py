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

:func:`keep_evicted_low_bit` is the mixed-precision variant (MiKV's idea): the entries
retention evicts are kept at low bits instead of dropped, the retained ones at full
precision; with ``page_tokens`` exactly as the engine stores them (``evicted_bits``),
else every evicted entry in position order (``benchmarks/accuracy/mixed_precision.py``,
docs/ACCURACY.md).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_fastkv.reference.fastkv import LayerKV, PrefillResult
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
        span = slice(done, due)
        keys[:, span], values[:, span] = _store_low_bit(
            keys[:, span], values[:, span], bits=self.bits, value_group=self.value_group,
            block_size=self.block_size,
        )  # fmt: skip
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


def keep_evicted_low_bit(
    full: PrefillResult,
    retained: PrefillResult,
    *,
    bits: int,
    value_group: int,
    block_size: int,
    page_tokens: int | None = None,
) -> PrefillResult:
    """Mixed precision (MiKV's idea): what retention evicts is stored at ``bits``, not dropped.

    ``full`` and ``retained`` are prefills of one prompt with the whole KV and with KV
    retention alone (``tsp_rate 1.0``: every layer ran over all ``T`` tokens). Each layer of
    the result holds the evicted entries of each KV head first, in ascending position,
    quantised as packed pages group them (keys per channel over ``block_size`` ranks,
    values per rank over ``value_group`` channels; a last partial group of keys stays at
    full precision), with the retained entries at full precision; entries are returned in
    position order per head (attention does not depend on the order: RoPE is applied to
    the keys), so every layer holds all ``T`` positions.

    ``page_tokens``: the engine's layout instead (:func:`engine_slots`): the entries in the
    order of its slots, and of the evicted ones (the first ``S`` slots) only the whole
    pages of ``page_tokens`` slots quantised, the rest at full precision. Decoding from
    it is what the engine computes (``indices`` then give each slot's position, no longer
    sorted).
    """
    layers = []
    for whole, kept in zip(full.layers, retained.layers, strict=True):
        heads, prompt_len, dim = whole.keys.shape
        if whole.positions.numel() != prompt_len or not torch.equal(whole.positions,
                                                                     kept.positions):
            raise ValueError("keep_evicted_low_bit needs retention alone (every layer over all T)")
        if page_tokens is not None:
            slots = engine_slots(kept.indices, prompt_len)
            ends = (prompt_len - kept.indices.shape[1]) // page_tokens * page_tokens
            rows = slots[..., None].expand(-1, -1, dim)
            keys, values = whole.keys.gather(1, rows), whole.values.gather(1, rows)
            keys[:, :ends], values[:, :ends] = _store_low_bit(
                keys[:, :ends], values[:, :ends], bits=bits, value_group=value_group,
                block_size=block_size,
            )  # fmt: skip
            layers.append(dataclasses.replace(kept, indices=slots, keys=keys, values=values))
            continue
        evicted = torch.ones(heads, prompt_len, dtype=torch.bool, device=whole.keys.device)
        evicted.scatter_(1, kept.indices.long(), False)
        count = prompt_len - kept.indices.shape[1]
        keys, values = _store_low_bit(
            whole.keys[evicted].view(heads, count, dim),
            whole.values[evicted].view(heads, count, dim),
            bits=bits, value_group=value_group, block_size=block_size,
        )  # fmt: skip
        indices = torch.cat([whole.positions[None].expand(heads, -1)[evicted].view(heads, count),
                             kept.indices], dim=1)  # fmt: skip
        # Back in position order per head (LayerKV's convention; attention is order-free).
        order = indices.argsort(dim=1)
        rows = order[..., None].expand(-1, -1, dim)
        layers.append(dataclasses.replace(
            kept,
            indices=indices.gather(1, order),
            keys=torch.cat([keys, kept.keys], dim=1).gather(1, rows),
            values=torch.cat([values, kept.values], dim=1).gather(1, rows),
        ))  # fmt: skip
    return dataclasses.replace(retained, layers=layers)


def engine_slots(selected: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The position each slot holds in the engine's mixed-precision layout, ``[heads, T]``.

    ``selected``: ``[heads, B']`` kept positions, ascending. With ``S = T - B'``, the
    ``i``-th selected position before ``S`` and the ``i``-th unselected one at or after
    ``S`` exchange slots; every other entry stays in its own slot.
    """
    heads, count = selected.shape
    start = prompt_len - count
    slots = torch.arange(prompt_len, device=selected.device).repeat(heads, 1)
    for head, kept in enumerate(selected.tolist()):
        chosen = set(kept)
        before = [p for p in kept if p < start]
        after = [p for p in range(start, prompt_len) if p not in chosen]
        for a, b in zip(before, after, strict=True):
            slots[head, a], slots[head, b] = b, a
    return slots


def round_trip_layer(layer: LayerKV, *, bits: int, value_group: int, block_size: int) -> LayerKV:
    """``layer`` with every entry stored at ``bits`` (grouped as in
    :func:`keep_evicted_low_bit`): quantisation alone, without retention."""
    keys, values = _store_low_bit(layer.keys, layer.values, bits=bits,
                                  value_group=value_group, block_size=block_size)  # fmt: skip
    return dataclasses.replace(layer, keys=keys, values=values)


def _store_low_bit(
    keys: torch.Tensor, values: torch.Tensor, *, bits: int, value_group: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[heads, n, dim]`` keys and values as packed pages store them: keys per channel over
    each ``block_size`` entries (a last partial group stays at full precision), values per
    entry over ``value_group`` channels."""
    heads, count, dim = keys.shape
    keys = keys.clone()
    grouped = count // block_size * block_size
    if grouped:
        k = keys[:, :grouped].reshape(heads, grouped // block_size, block_size, dim)
        keys[:, :grouped] = _round_trip(k, bits, dim=2).reshape(heads, grouped, dim)
    group = min(value_group, dim)
    values = _round_trip(values.reshape(heads, count, dim // group, group), bits,
                         dim=3).reshape(heads, count, dim)  # fmt: skip
    return keys, values


def _round_trip(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantise in groups along ``dim`` and back, in ``x``'s dtype."""
    return dequantize_groups_ref(*quantize_groups_ref(x, bits, dim)).to(x.dtype)
