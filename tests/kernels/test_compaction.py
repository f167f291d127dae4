"""compact_kv: the Triton kernel and the reference against an entry-by-entry model of the
move, on every byte of the cache allocation (other sequences, spare blocks, stale slots),
for front compaction (``starts`` None / 0) and tail-aligned compaction
(``starts = T - counts``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import compact_kv, compact_kv_ref, compaction, select_retained
from vllm_fastkv.kernels.reference import kept_count

WINDOW = 8


def expected_after(paged, indices, counts, starts=None):
    """The whole allocation after compaction, built one (sequence, head, entry) at a time:
    logical slot start + r (r < count) takes old slot indices[r]; every other byte stays."""
    expected = paged.kv_cache.clone()
    head_dim = paged.key_cache.shape[-1]
    block_size = paged.key_cache.shape[1]
    old_views = paged.kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    new_views = expected.transpose(1, 2).split(head_dim, dim=-1)
    for old, new in zip(old_views, new_views):
        old, new = old.view(torch.uint8), new.view(torch.uint8)
        for s, count in enumerate(counts.tolist()):
            row = paged.block_table[s].tolist()
            start = 0 if starts is None else int(starts[s])
            for h in range(old.shape[2]):
                for r, src in enumerate(indices[s, h, :count].tolist()):
                    dst = start + r
                    dst_slot = (row[dst // block_size], dst % block_size, h)
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


def tail_selection(paged, budgets, seed, tail=None):
    """Like random_selection, but sequences with ``tail[s]`` (default: all) keep
    ``c = T - S`` entries with ``S`` the largest block multiple such that ``c`` covers the
    budget (the serving path's rounding) and get ``starts[s] = S``; the others keep their
    budget and start at 0. Returns ``(indices, counts, starts)``."""
    block_size = paged.key_cache.shape[1]
    seq_lens = paged.seq_lens.tolist()
    tail = [True] * len(seq_lens) if tail is None else tail
    rounded = []
    for t, b, is_tail in zip(seq_lens, budgets, tail):
        kept = kept_count(t, b, WINDOW)
        rounded.append(t - (t - kept) // block_size * block_size if is_tail else b)
    indices, counts = random_selection(paged, rounded, seed)
    starts = [t - c if is_tail else 0 for t, c, is_tail in zip(seq_lens, counts.tolist(), tail)]
    for t, c, start, is_tail in zip(seq_lens, counts.tolist(), starts, tail):
        assert start == 0 or (start + c == t and start % block_size == 0 and is_tail)
    return indices, counts, torch.tensor(starts, device=counts.device)


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


@pytest.mark.parametrize(
    "dtype, block_size, head_dim, num_kv_heads",
    [
        (torch.float16, 16, 64, 1),
        (torch.bfloat16, 32, 128, 2),
        (torch.float32, 16, 64, 4),
        (torch.float8_e4m3fn, 32, 64, 2),
    ],
)
def test_tail_matches_model_and_reference(
    dtype, block_size, head_dim, num_kv_heads, paged_kv, poison_empty
):
    """Tail-aligned: kept entries fill [T - c, T), c rounded up to free whole blocks."""
    seq_lens = [300, 5, 77, 129, 40]
    budgets = [40, 3, 77, 100, 10]  # evict a lot, T < window, T == B, T < B, B ~ window
    paged = paged_kv(
        seq_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=block_size + head_dim + num_kv_heads,
    )
    indices, counts, starts = tail_selection(paged, budgets, seed=head_dim)
    assert int(starts[0]) >= 256  # the long prompt really moves to the tail
    expected = expected_after(paged, indices, counts, starts)

    assert_both_compact_to(paged, indices, counts, starts, expected)


def test_mixed_front_and_tail_batch(paged_kv, poison_empty):
    """One launch pair for a batch where some sequences compact to the front (start 0) and
    others to the tail; int32 starts."""
    seq_lens = [200, 130, 70, 9, 150]
    budgets = [30, 50, 20, 5, 64]
    tail = [True, False, True, False, True]
    paged = paged_kv(
        seq_lens, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=11
    )
    indices, counts, starts = tail_selection(paged, budgets, seed=11, tail=tail)
    starts = starts.to(torch.int32)
    assert [int(x) > 0 for x in starts] == [True, False, True, False, True]
    expected = expected_after(paged, indices, counts, starts)

    assert_both_compact_to(paged, indices, counts, starts, expected)


def shift_patterns(seq_len, count, device):
    """Head 0: shift by one (every source is the next entry's destination); head 1: shift
    by exactly one 64-entry tile; both span many tiles."""
    r = torch.arange(count, device=device)
    return torch.stack([r + 1, r + 64])[None], torch.tensor([count], device=device)


def tail_shift_patterns(seq_len, count, device):
    """Tail mirror of :func:`shift_patterns` with start S = T - count: head 0 shifts every
    entry one slot towards the tail (x_r = S + r - 1, every source is the previous entry's
    destination), head 1 by ``S`` slots (x_r = r; one 64-entry tile when S = 64). The
    destinations reach ``T - 1 >= max_keep``, so a stage indexed by destination would
    overflow."""
    start = seq_len - count
    r = torch.arange(count, device=device)
    indices = torch.stack([start + r - 1, r])[None]
    return indices, torch.tensor([count], device=device), torch.tensor([start], device=device)


def test_adversarial_shifts(paged_kv, poison_empty):
    paged = paged_kv([400], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3)
    indices, counts = shift_patterns(400, 336, paged.seq_lens.device)
    expected = expected_after(paged, indices, counts)
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, expected)


def test_tail_adversarial_shifts(paged_kv, poison_empty):
    paged = paged_kv([400], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=3)
    indices, counts, starts = tail_shift_patterns(400, 336, paged.seq_lens.device)
    expected = expected_after(paged, indices, counts, starts)
    compact_kv(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts
    )
    assert_bytes_equal(paged.kv_cache, expected)


@pytest.mark.parametrize("pattern", ["shift", "selected", "tail_shift", "mixed"])
def test_writes_never_read_cache_slots_they_overwrite(pattern, paged_kv):
    """Order independence: after the staging launch, garbage in every slot the write launch
    overwrites must not matter. Programs of one launch run in any order on a GPU, so a
    write launch that read such a slot from the cache would race with its own writes."""
    paged = paged_kv(
        [400, 150], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=4
    )
    device = paged.seq_lens.device
    starts = None
    if pattern in ("shift", "tail_shift"):
        if pattern == "shift":
            indices, counts = shift_patterns(400, 336, device)
        else:
            indices, counts, starts = tail_shift_patterns(400, 336, device)
            starts = torch.cat([starts, torch.zeros_like(starts)])
        indices = torch.cat([indices, torch.full_like(indices, -1)])
        counts = torch.cat([counts, torch.zeros_like(counts)])
    elif pattern == "selected":
        indices, counts = random_selection(paged, [200, 60], seed=4)
    else:
        indices, counts, starts = tail_selection(paged, [200, 60], seed=4, tail=[True, False])
    expected = expected_after(paged, indices, counts, starts)

    key, value = paged.key_cache.view(torch.int16), paged.value_cache.view(torch.int16)
    stage = compaction._new_stage(key, indices)
    args = (key, value, stage, paged.block_table, indices, counts)
    compaction._run_phase(*args, starts=starts, stage_phase=True)
    block_size = paged.key_cache.shape[1]
    for s, count in enumerate(counts.tolist()):
        row = paged.block_table[s].tolist()
        start = 0 if starts is None else int(starts[s])
        for h in range(2):
            for r, src in enumerate(indices[s, h, :count].tolist()):
                dst = start + r
                if src != dst:
                    for half in (key, value):
                        junk = torch.randint(-(2**15), 2**15, (64,), dtype=torch.int16)
                        half[row[dst // block_size], dst % block_size, h] = junk.to(half.device)
    compaction._run_phase(*args, starts=starts, stage_phase=False)
    assert_bytes_equal(paged.kv_cache, expected)


def test_keep_all_moves_nothing(paged_kv):
    paged = paged_kv(
        [70, 33], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=5
    )
    indices, counts = random_selection(paged, [70, 100], seed=5)
    before = paged.kv_cache.clone()
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts)
    assert_bytes_equal(paged.kv_cache, before)
    zeros = torch.zeros_like(counts)
    compact_kv(paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=zeros)
    assert_bytes_equal(paged.kv_cache, before)


def test_tail_in_place_moves_nothing(paged_kv, poison_empty):
    """Entries already at their tail slots (x_r = S + r) are left alone, by both sides."""
    paged = paged_kv(
        [70, 33], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=6
    )
    device = paged.seq_lens.device
    counts = torch.tensor([38, 33], device=device)
    starts = torch.tensor([32, 0], device=device)
    indices = torch.full((2, 2, 38), -1, dtype=torch.long, device=device)
    indices[0] = torch.arange(32, 70, device=device)
    indices[1, :, :33] = torch.arange(33, device=device)
    before = paged.kv_cache.clone()
    compact_kv_ref(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts
    )
    assert_bytes_equal(paged.kv_cache, before)
    compact_kv(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts
    )
    assert_bytes_equal(paged.kv_cache, before)


@pytest.mark.parametrize("fn", [compact_kv, compact_kv_ref])
@pytest.mark.parametrize("bad", [(3,), (2, 1), ()])
def test_starts_shape_is_checked(fn, bad, paged_kv):
    paged = paged_kv(
        [40, 20], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=7
    )
    indices, counts = random_selection(paged, [16, 16], seed=7)
    starts = torch.zeros(bad, dtype=torch.long, device=counts.device)
    with pytest.raises(ValueError, match="starts"):
        fn(paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts)
    with pytest.raises(ValueError, match="starts"):
        fn(
            paged.key_cache,
            paged.value_cache,
            paged.block_table,
            indices,
            counts,
            starts=torch.zeros(2, device=counts.device),
        )


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


@settings(max_examples=8, deadline=None)
@given(
    batch=st.lists(
        st.tuples(st.integers(1, 150), st.integers(0, 160), st.booleans()), min_size=1, max_size=3
    ),
    heads=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_random_tail_batches(paged_kv, batch, heads, block_size, seed):
    seq_lens, budgets, tail = map(list, zip(*batch))
    paged = paged_kv(
        seq_lens,
        num_kv_heads=heads,
        head_dim=64,
        block_size=block_size,
        dtype=torch.float16,
        seed=seed,
    )
    indices, counts, starts = tail_selection(paged, budgets, seed, tail=tail)
    expected = expected_after(paged, indices, counts, starts)
    compact_kv(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts
    )
    assert_bytes_equal(paged.kv_cache, expected)


@st.composite
def direct_selections(draw):
    """Per sequence: T, a kept count c in [0, T], front (start 0) or tail (start T - c,
    not necessarily block aligned), and per head any strictly ascending c-subset of
    [0, T) (not just what select_retained produces)."""
    block_size = draw(st.sampled_from([16, 32]))
    heads = draw(st.integers(1, 3))
    seqs = draw(
        st.lists(
            st.tuples(st.integers(1, 100), st.floats(0, 1), st.booleans()), min_size=1, max_size=4
        )
    )
    seq_lens = [t for t, _, _ in seqs]
    counts = [round(frac * t) for t, frac, _ in seqs]
    starts = [t - c if tail else 0 for (t, _, tail), c in zip(seqs, counts)]
    kept = [
        [sorted(draw(st.permutations(range(t)))[:c]) for _ in range(heads)]
        for t, c in zip(seq_lens, counts)
    ]
    return block_size, heads, seq_lens, counts, starts, kept, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(selection=direct_selections())
def test_reference_random_front_and_tail(paged_kv, selection):
    """The oracle alone against the entry-by-entry model, on arbitrary ascending subsets."""
    block_size, heads, seq_lens, counts, starts, kept, seed = selection
    paged = paged_kv(
        seq_lens,
        num_kv_heads=heads,
        head_dim=16,
        block_size=block_size,
        dtype=torch.float16,
        seed=seed,
    )
    device = paged.seq_lens.device
    indices = torch.full((len(seq_lens), heads, max(counts)), -1, dtype=torch.long)
    for s, rows in enumerate(kept):
        for h, row in enumerate(rows):
            indices[s, h, : len(row)] = torch.tensor(row, dtype=torch.long)
    indices = indices.to(device)
    counts_t = torch.tensor(counts, device=device)
    starts_t = torch.tensor(starts, device=device)
    expected = expected_after(paged, indices, counts_t, starts_t)
    compact_kv_ref(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts_t, starts=starts_t
    )
    assert_bytes_equal(paged.kv_cache, expected)


def assert_both_compact_to(paged, indices, counts, starts, expected) -> None:
    """Reference (on a copy) and kernel (in place) both leave exactly ``expected``."""
    ref_kv = paged.kv_cache.clone()
    head_dim = paged.key_cache.shape[-1]
    compact_kv_ref(
        *ref_kv.transpose(1, 2).split(head_dim, dim=-1),
        paged.block_table,
        indices,
        counts,
        starts=starts,
    )
    assert_bytes_equal(ref_kv, expected)
    compact_kv(
        paged.key_cache, paged.value_cache, paged.block_table, indices, counts, starts=starts
    )
    assert_bytes_equal(paged.kv_cache, expected)
