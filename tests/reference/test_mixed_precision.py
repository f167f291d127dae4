"""keep_evicted_low_bit: retained entries exact, evicted ones stored at low bits, none lost."""

from __future__ import annotations

import pytest
import torch

from vllm_fastkv.reference import (
    fastkv_prefill,
    forced_decode_logits,
    greedy_decode,
    keep_evicted_low_bit,
)
from vllm_fastkv.reference.lowbit import engine_slots, round_trip_layer
from vllm_fastkv.reference.quantization import dequantize_groups_ref, quantize_groups_ref

STORE = dict(value_group=8, block_size=4)


def prefills(model, prompt_len: int = 203, seed: int = 0):
    ids = torch.randint(1, 512, (prompt_len,), generator=torch.Generator().manual_seed(seed))
    full = fastkv_prefill(model, ids, policy="full")
    retained = fastkv_prefill(model, ids, policy="fastkv", tsp_rate=1.0, retain_rate=0.1)
    return full, retained


@pytest.mark.parametrize("bits", [2, 4])
def test_retained_exact_evicted_quantised(llama_model, bits):
    full, retained = prefills(llama_model)
    mixed = keep_evicted_low_bit(full, retained, bits=bits, **STORE)
    for whole, kept, layer in zip(full.layers, retained.layers, mixed.layers, strict=True):
        heads, prompt_len, dim = whole.keys.shape
        # Every position is back, in order, per head.
        assert torch.equal(layer.indices, torch.arange(prompt_len).expand(heads, -1))
        is_kept = torch.zeros(heads, prompt_len, dtype=torch.bool)
        is_kept.scatter_(1, kept.indices, True)
        assert torch.equal(layer.keys[is_kept], whole.keys[is_kept])
        assert torch.equal(layer.values[is_kept], whole.values[is_kept])
        # Evicted values: per entry over groups of 8 channels, exactly the round trip.
        evicted = whole.values[~is_kept].view(heads, -1, dim // 8, 8)
        expected = dequantize_groups_ref(*quantize_groups_ref(evicted, bits, dim=3))
        torch.testing.assert_close(layer.values[~is_kept], expected.view(-1, dim), rtol=0,
                                   atol=0)  # fmt: skip
        # Keys: quantised per channel in groups of 4 evicted entries; the last partial
        # group (evicted count not a multiple of 4) stays exact.
        count = prompt_len - kept.indices.shape[1]
        keys = whole.keys[~is_kept].view(heads, count, dim)
        stored = layer.keys[~is_kept].view(heads, count, dim)
        grouped = count // 4 * 4
        tail = slice(grouped, count)
        assert torch.equal(stored[:, tail], keys[:, tail])
        groups = keys[:, :grouped].reshape(heads, -1, 4, dim)
        expected = dequantize_groups_ref(*quantize_groups_ref(groups, bits, dim=2))
        torch.testing.assert_close(stored[:, :grouped], expected.reshape(heads, grouped, dim),
                                   rtol=0, atol=0)  # fmt: skip
        assert not torch.equal(stored[:, :grouped], keys[:, :grouped])


def test_mixed_sits_between_retention_and_full(llama_model):
    """More precision in the evicted entries brings the logits closer to full KV's:
    retention (evicted dropped) is farthest, then 2 bits, then 4."""
    full, retained = prefills(llama_model, prompt_len=300, seed=1)
    tokens = greedy_decode(llama_model, full, 8)

    reference = forced_decode_logits(llama_model, full, tokens)
    gaps = [
        (forced_decode_logits(llama_model, prefill, tokens) - reference).abs().mean().item()
        for prefill in (
            retained,
            keep_evicted_low_bit(full, retained, bits=2, **STORE),
            keep_evicted_low_bit(full, retained, bits=4, **STORE),
        )
    ]
    assert gaps[0] > gaps[1] > gaps[2] > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_engine_layout_packs_whole_pages_of_evicted_slots(llama_model, bits):
    """``page_tokens``: the entries in the engine's slot order (engine_slots), of the
    evicted slots ``[0, S)`` the whole pages quantised (keys per channel over 4 slots,
    values per slot over 8 channels), everything after them exact."""
    full, retained = prefills(llama_model)
    page = 12
    mixed = keep_evicted_low_bit(full, retained, bits=bits, page_tokens=page, **STORE)
    for whole, kept, layer in zip(full.layers, retained.layers, mixed.layers, strict=True):
        heads, prompt_len, dim = whole.keys.shape
        slots = engine_slots(kept.indices, prompt_len)
        assert torch.equal(layer.indices, slots)
        rows = slots[..., None].expand(-1, -1, dim)
        keys, values = whole.keys.gather(1, rows), whole.values.gather(1, rows)
        packed = (prompt_len - kept.indices.shape[1]) // page * page
        assert 0 < packed < prompt_len - kept.indices.shape[1]
        assert torch.equal(layer.keys[:, packed:], keys[:, packed:])
        assert torch.equal(layer.values[:, packed:], values[:, packed:])
        groups = keys[:, :packed].reshape(heads, -1, 4, dim)
        expected = dequantize_groups_ref(*quantize_groups_ref(groups, bits, dim=2))
        torch.testing.assert_close(layer.keys[:, :packed], expected.reshape(heads, packed, dim),
                                   rtol=0, atol=0)  # fmt: skip
        groups = values[:, :packed].reshape(heads, packed, dim // 8, 8)
        expected = dequantize_groups_ref(*quantize_groups_ref(groups, bits, dim=3))
        torch.testing.assert_close(layer.values[:, :packed],
                                   expected.reshape(heads, packed, dim), rtol=0, atol=0)


def test_round_trip_layer_stores_everything(llama_model):
    full, _ = prefills(llama_model)
    layer = full.layers[0]
    stored = round_trip_layer(layer, bits=4, **STORE)
    assert torch.equal(stored.indices, layer.indices)
    assert stored.keys.shape == layer.keys.shape and not torch.equal(stored.keys, layer.keys)


def test_needs_retention_alone(llama_model):
    ids = torch.arange(1, 301)
    full = fastkv_prefill(llama_model, ids, policy="full")
    propagated = fastkv_prefill(llama_model, ids, policy="fastkv", tsp_rate=0.5, tsp_layer=1,
                                retain_rate=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="retention alone"):
        keep_evicted_low_bit(full, propagated, bits=2, **STORE)
