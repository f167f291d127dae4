"""compact_kv: the Triton kernel and the reference against an entry-by-entry model of the
move, on every byte of the cache allocation (other sequences, spare blocks, stale tails)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import compact_kv, compact_kv_ref, compaction, select_retained

WINDOW = 8


def expected_after(paged, indices, counts):
    """The whole allocation after compaction, built one (sequence, head, entry) at a time:
    logical slot r < count takes old slot indices[r]; every other byte stays."""
    expected = paged.kv_cache.clone()
    head_dim = paged.key_cache.shape[-1]
    block_size = paged.key_cache.shape[1]
    old_views = paged.kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    new_views = expected.transpose(1, 2).split(head_dim, dim=-1)
    for old, new in zip(old_views, new_views):
        old, new = old.view(torch.uint8), new.view(torch.uint8)
        for s, count in enumerate(counts.tolist()):
            row = paged.block_table[s].tolist()
            for h in range(old.shape[2]):
                for r, src in enumerate(indices[s, h, :count].tolist()):
                    dst_slot = (row[r // block_size], r % block_size, h)
                    new[dst_slot] = old[row[src // block_size], src % block_size, h]
    return expected


def random_selection(paged, budgets, seed):
    """select_retained over random scores, as the serving path produces indices."""
    seq_lens = paged.seq_lens
    heads = paged.key_cache.shape[2]
    gen = torch.Generator().manual_seed(seed)
    width = max(int(seq_lens.max()) - WINDOW, 0)
    scores = torch.rand(len(seq_lens), heads, width, generator=gen).to(seq_lens.device)
    budget_t = torch.tensor(budgets, dtype=torch.int32, device=seq_lens.device)
    return select_retained(scores, seq_lens, budget_t, WINDOW)


def assert_bytes_equal(a, b):
    assert torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize(
    "dtype, block_size, head_dim",
    [
        (torch.float16, 16, 64),
        (torch.bfloat16, 32, 128),
        (torch.float32, 16, 64),
        (torch.float8_e4m3fn, 32, 64),
    ],
)
def test_matches_model_and_reference(dtype, block_size, head_dim, paged_kv, poison_empty):
    seq_lens = [300, 5, 77, 129, 40]
    budgets = [40, 3, 77, 100, 10]  # evict a lot, T < window, T == B, T < B, B ~ window
    paged = paged_kv(
        seq_lens,
        num_kv_heads=2,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=block_size + head_dim,
    )
    indices, counts = random_selection(paged, budgets, seed=head_dim)
    expected = expected_after(paged, indices, counts)

    ref_kv = paged.kv_cache.clone()
    compact_kv_ref(
        *ref_kv.transpose(1, 2).split(head_dim, dim=-1), paged.block_table, indices, counts
    )
    assert_bytes_equal(ref_kv, expected)

    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, expected)


def shift_patterns(seq_len, count, device):
    """Head 0: shift by one (every source is the next entry's destination); head 1: shift
    by exactly one 64-entry tile; both span many tiles."""
    r = torch.arange(count, device=device)
    return torch.stack([r + 1, r + 64])[None], torch.tensor([count], device=device)


def test_adversarial_shifts(paged_kv, poison_empty):
    paged = paged_kv([400], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3)
    indices, counts = shift_patterns(400, 336, paged.seq_lens.device)
    expected = expected_after(paged, indices, counts)
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, expected)


@pytest.mark.parametrize("pattern", ["shift", "selected"])
def test_writes_never_read_cache_slots_they_overwrite(pattern, paged_kv):
    """Order independence: after the staging launch, garbage in every slot the write launch
    overwrites must not matter. Programs of one launch run in any order on a GPU, so a
    write launch that read such a slot from the cache would race with its own writes."""
    paged = paged_kv(
        [400, 150], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=4
    )
    if pattern == "shift":
        indices, counts = shift_patterns(400, 336, paged.seq_lens.device)
        indices = torch.cat([indices, torch.full_like(indices, -1)])
        counts = torch.cat([counts, torch.zeros_like(counts)])
    else:
        indices, counts = random_selection(paged, [200, 60], seed=4)
    expected = expected_after(paged, indices, counts)

    key, value = paged.key_cache.view(torch.int16), paged.value_cache.view(torch.int16)
    stage = compaction._new_stage(key, indices)
    compaction._run_phase(key, value, stage, paged.block_table, indices, counts, stage_phase=True)
    block_size = paged.key_cache.shape[1]
    for s, count in enumerate(counts.tolist()):
        row = paged.block_table[s].tolist()
        for h in range(2):
            for r, src in enumerate(indices[s, h, :count].tolist()):
                if src != r:
                    for half in (key, value):
                        junk = torch.randint(-(2**15), 2**15, (64,), dtype=torch.int16)
                        half[row[r // block_size], r % block_size, h] = junk.to(half.device)
    compaction._run_phase(key, value, stage, paged.block_table, indices, counts, stage_phase=False)
    assert_bytes_equal(paged.kv_cache, expected)


def test_keep_all_moves_nothing(paged_kv):
    paged = paged_kv(
        [70, 33], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=5
    )
    indices, counts = random_selection(paged, [70, 100], seed=5)
    before = paged.kv_cache.clone()
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, before)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.lists(st.tuples(st.integers(1, 150), st.integers(0, 160)), min_size=1, max_size=3),
    heads=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_random_batches(paged_kv, batch, heads, block_size, seed):
    seq_lens, budgets = map(list, zip(*batch))
    paged = paged_kv(
        seq_lens,
        num_kv_heads=heads,
        head_dim=64,
        block_size=block_size,
        dtype=torch.float16,
        seed=seed,
    )
    indices, counts = random_selection(paged, budgets, seed)
    expected = expected_after(paged, indices, counts)
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, expected)
