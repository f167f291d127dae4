"""select_retained / select_propagated: exact agreement with the reference, and the
properties the rest of FastKV relies on (window kept, sorted, counts, -1 padding, top-k)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import (
    select_propagated,
    select_propagated_ref,
    select_retained,
    select_retained_ref,
)


def random_scores(seq_lens, heads, window, seed, device, pad=float("-inf")):
    """Distinct random scores in [0, 1) before each window, ``pad`` after (window_scores
    pads with -inf; selection must ignore the padding whatever it holds)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(
        len(seq_lens), heads, max(max(seq_lens, default=0) - window, 0), generator=gen
    )
    for s, seq_len in enumerate(seq_lens):
        scores[s, :, max(seq_len - window, 0) :] = pad
    return scores.to(device)


def check_selection(indices, counts, scores, seq_lens, budgets, window):
    """Per row: counts, sorted unique in-range indices, -1 padding, the window kept, and
    every kept scored token outranking every evicted one."""
    assert indices.dtype == torch.long and indices.shape[:2] == scores.shape[:2]
    assert indices.shape[2] == max(counts.tolist(), default=0)
    for s, (seq_len, budget) in enumerate(zip(seq_lens, budgets)):
        count = min(max(budget, window), seq_len)
        assert counts[s] == count
        for h in range(scores.shape[1]):
            row = indices[s, h].cpu()
            kept, padding = row[:count], row[count:]
            assert (padding == -1).all()
            assert (kept.diff() > 0).all() and kept.min() >= 0 and kept.max() < seq_len
            recent = torch.arange(max(seq_len - window, 0), seq_len)
            assert torch.isin(recent, kept).all()
            scored = kept[kept < seq_len - window]
            evicted = torch.ones(max(seq_len - window, 0), dtype=torch.bool)
            evicted[scored] = False
            row_scores = scores[s, h].cpu()
            if evicted.any() and len(scored):
                assert row_scores[scored].min() > row_scores[: len(evicted)][evicted].max()


batch = st.lists(st.tuples(st.integers(1, 120), st.integers(0, 130)), min_size=1, max_size=4)
pads = st.sampled_from([float("-inf"), 2.0])  # 2.0 outranks every real score


@settings(max_examples=60, deadline=None)
@given(
    batch=batch,
    heads=st.integers(1, 4),
    window=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    pad=pads,
)
@example(  # T < window, T == B, T == B + 1, B < window, B > T, B == 0
    batch=[(5, 2), (77, 77), (78, 77), (60, 3), (30, 100), (50, 0)],
    heads=2,
    window=8,
    seed=0,
    pad=2.0,
)
def test_retained_matches_reference(device, batch, heads, window, seed, pad):
    seq_lens, budgets = map(list, zip(*batch))
    scores = random_scores(seq_lens, heads, window, seed, device, pad)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    budget_t = torch.tensor(budgets, dtype=torch.int32, device=device)
    indices, counts = select_retained(scores, lens, budget_t, window)
    ref_indices, ref_counts = select_retained_ref(scores, lens, budget_t, window)
    assert torch.equal(indices, ref_indices) and torch.equal(counts, ref_counts)
    check_selection(indices, counts, scores, seq_lens, budgets, window)
    host_indices, host_counts = select_retained(scores, seq_lens, budgets, window)
    assert torch.equal(host_indices, indices) and torch.equal(host_counts, counts)


@settings(max_examples=40, deadline=None)
@given(
    batch=batch,
    heads=st.integers(1, 4),
    window=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    pad=pads,
)
def test_propagated_matches_reference(device, batch, heads, window, seed, pad):
    seq_lens, keeps = map(list, zip(*batch))
    scores = random_scores(seq_lens, heads, window, seed, device, pad)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    keep = torch.tensor(keeps, dtype=torch.long, device=device)
    indices = select_propagated(scores, lens, keep, window)
    assert torch.equal(indices, select_propagated_ref(scores, lens, keep, window))
    assert torch.equal(select_propagated(scores, seq_lens, keeps, window), indices)
    counts = torch.tensor([min(max(p, window), t) for t, p in zip(seq_lens, keeps)])
    summed = scores.sum(dim=1, keepdim=True)
    check_selection(indices[:, None], counts, summed, seq_lens, keeps, window)


def test_keep_all_ignores_score_values(device):
    """A prompt within budget keeps every token even if its scores are NaN."""
    scores = torch.full((1, 2, 12), float("nan"), device=device)
    lens = torch.tensor([20], device=device)
    indices, counts = select_retained(scores, lens, torch.tensor([20], device=device), 8)
    assert counts.tolist() == [20]
    assert torch.equal(indices.cpu(), torch.arange(20).expand(1, 2, 20))


def test_empty_batch(device):
    empty = torch.empty(0, dtype=torch.int32, device=device)
    indices, counts = select_retained(torch.empty(0, 2, 0, device=device), empty, empty, 8)
    assert indices.shape == (0, 2, 0) and counts.shape == (0,)


def test_rejects_mismatched_lengths(device):
    scores = torch.zeros(2, 1, 4, device=device)
    with pytest.raises(ValueError, match="num_seqs"):
        select_retained(scores, [12, 12], [5], 8)
    with pytest.raises(ValueError, match="num_seqs"):
        select_retained(scores, torch.tensor([[12], [12]]), [5, 5], 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_lengths_need_no_device_sync():
    """With lengths and budgets as host lists neither selection syncs the device."""
    seq_lens, budgets = [300, 40, 1000], [64, 100, 8]
    scores = random_scores(seq_lens, 4, 8, seed=1, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        indices, counts = select_retained(scores, seq_lens, budgets, 8)
        propagated = select_propagated(scores, seq_lens, budgets, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lens = torch.tensor(seq_lens, device="cuda")
    ref_indices, ref_counts = select_retained_ref(scores, lens, torch.tensor(budgets), 8)
    assert torch.equal(indices, ref_indices) and torch.equal(counts, ref_counts)
    assert torch.equal(propagated, select_propagated_ref(scores, lens, torch.tensor(budgets), 8))
