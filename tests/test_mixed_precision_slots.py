"""Mixed precision's cache layout: selected entries to ``[S, T)``, evicted ones to ``[0, S)``.

``kv_compression._trade_slots`` (the engine, on paged caches, all rows and heads at once)
against ``reference.lowbit.engine_slots`` (per head, on positions), which the reference
decodes from in the end-to-end tests.
"""

from __future__ import annotations

import pytest
import torch

from vllm_fastkv.kv_compression import _trade_slots
from vllm_fastkv.reference.lowbit import engine_slots

BLOCK = 16


def _selection(prompt_len: int, count: int, heads: int, window: int, gen: torch.Generator):
    """``[heads, count]`` ascending positions: random ones plus the last ``window``."""
    rows = []
    for _ in range(heads):
        top = torch.randperm(prompt_len - window, generator=gen)[: count - window]
        rows.append(torch.cat([top, torch.arange(prompt_len - window, prompt_len)]).sort().values)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_trade_slots_matches_the_reference_layout(dtype):
    gen = torch.Generator().manual_seed(0)
    heads, dim, window = 3, 8, 4
    lens, counts = [100, 37, 64, 250], [32, 21, 64, 48]  # one row keeps everything
    num_blocks = sum(-(-t // BLOCK) for t in lens) + 5
    kv = torch.randn(num_blocks, BLOCK, heads, 2 * dim, generator=gen).to(dtype)
    key_cache, value_cache = kv.split(dim, dim=-1)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-t // BLOCK) for t in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for row, t in enumerate(lens):
        blocks = [order.pop() for _ in range(-(-t // BLOCK))]
        tables[row, : len(blocks)] = torch.tensor(blocks)
    selected = [_selection(t, c, heads, window, gen) for t, c in zip(lens, counts)]
    indices = torch.full((len(lens), heads, max(counts)), -1, dtype=torch.long)
    for row, sel in enumerate(selected):
        indices[row, :, : sel.shape[1]] = sel
    before = kv.clone()
    _trade_slots(key_cache, value_cache, tables, indices, torch.tensor(counts),
                 torch.tensor([t - c for t, c in zip(lens, counts)]))  # fmt: skip

    def logical(cache: torch.Tensor, row: int, prompt_len: int) -> torch.Tensor:
        """``[heads, T, 2 * dim]`` of a row in slot order, as raw integers (any dtype)."""
        slots = torch.arange(prompt_len)
        raw = cache.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[cache.element_size()])
        return raw[tables[row, slots // BLOCK].long(), slots % BLOCK].transpose(0, 1)

    touched = set()
    for row, (t, sel) in enumerate(zip(lens, selected)):
        slots = engine_slots(sel, t)
        expected = logical(before, row, t).gather(1, slots[..., None].expand(-1, -1, 2 * dim))
        assert torch.equal(logical(kv, row, t), expected), row
        # The selected entries are at [S, T), the evicted ones before them.
        start = t - sel.shape[1]
        assert torch.equal(slots[:, start:].sort().values, sel)
        touched.update(tables[row, : -(-t // BLOCK)].tolist())
    untouched = [b for b in range(num_blocks) if b not in touched]
    assert torch.equal(kv[untouched].view(torch.uint8), before[untouched].view(torch.uint8))


def test_engine_slots_trades_in_ascending_order():
    """T = 10, selected {1, 3, 8, 9}: S = 6; 1 and 3 trade with 6 and 7."""
    slots = engine_slots(torch.tensor([[1, 3, 8, 9]]), 10)
    assert slots.tolist() == [[0, 6, 2, 7, 4, 5, 1, 3, 8, 9]]
