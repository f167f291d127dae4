"""window_scores: Triton vs the reference, and the reference vs a naive dense version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fastkv.kernels import window_scores, window_scores_ref

# Relative error (||out - ref|| / ||ref||) allowed for each query dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Ragged lengths: T < window, T == window, one scored token, not a multiple of the block.
SEQ_LENS = [300, 5, 8, 9, 77, 129]


def naive_scores(query, paged, *, scale, window, pool_kernel, pooling, k_scale=1.0):
    """FastKV scores sequence by sequence: block-by-block dense gather, repeat_kv,
    F.softmax over position-masked logits, F pooling per query head, group sum."""
    num_seqs, _, num_q_heads, _ = query.shape
    _, block_size, num_kv_heads, _ = paged.key_cache.shape
    group = num_q_heads // num_kv_heads
    seq_lens = paged.seq_lens.tolist()
    out = torch.full((num_seqs, num_kv_heads, max(max(seq_lens) - window, 0)), float("-inf"))
    for s, seq_len in enumerate(seq_lens):
        num_scored = seq_len - window
        if num_scored <= 0:
            continue
        blocks = [
            paged.key_cache[paged.block_table[s, b]] for b in range(-(-seq_len // block_size))
        ]
        keys = torch.cat(blocks)[:seq_len].float().cpu() * k_scale  # [T, Hkv, d]
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, T, d]
        q = query[s].float().cpu().transpose(0, 1)  # [Hq, w, d]
        logits = q @ keys.transpose(1, 2) * scale
        q_pos = torch.arange(seq_len - window, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        probs = F.softmax(logits.masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
        mass = probs[:, :, :num_scored].sum(dim=1, keepdim=True)  # [Hq, 1, n]
        if pooling == "avg":
            pooled = F.avg_pool1d(mass, pool_kernel, stride=1, padding=pool_kernel // 2)
        else:
            pooled = F.max_pool1d(mass, pool_kernel, stride=1, padding=pool_kernel // 2)
        out[s, :, :num_scored] = pooled[:, 0].view(num_kv_heads, group, num_scored).sum(dim=1)
    return out


def random_query(num_seqs, window, num_q_heads, head_dim, dtype, device):
    """Window queries as a non-contiguous view (heads and window swapped in memory)."""
    return torch.randn(num_seqs, num_q_heads, window, head_dim).to(dtype).to(device).transpose(1, 2)


def assert_scores_match(out, ref, rel_tol):
    """Same -inf padding mask, no NaN, and ``||out - ref|| / ||ref|| <= rel_tol`` elsewhere."""
    out, ref = out.cpu(), ref.cpu()
    assert out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN entries"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.equal(out[~finite], ref[~finite])  # all -inf
    err = (out[finite] - ref[finite]).norm() / ref[finite].norm()
    assert err <= rel_tol, f"relative error {err:.3g} > {rel_tol}"


@settings(max_examples=25, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    window=st.integers(1, 8),
    group=st.sampled_from([1, 2, 4]),
    num_kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([8, 32]),
    block_size=st.sampled_from([4, 16]),
    pool_kernel=st.sampled_from([1, 3, 7]),
    pooling=st.sampled_from(["avg", "max"]),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_naive(
    paged_kv,
    device,
    seq_lens,
    window,
    group,
    num_kv_heads,
    head_dim,
    block_size,
    pool_kernel,
    pooling,
    seed,
):
    paged = paged_kv(
        seq_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
        seed=seed,
    )
    torch.manual_seed(seed)
    query = random_query(
        len(seq_lens), window, group * num_kv_heads, head_dim, torch.float32, device
    )
    kwargs = dict(scale=head_dim**-0.5, window=window, pool_kernel=pool_kernel, pooling=pooling)
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    naive = naive_scores(query, paged, **kwargs)
    assert torch.equal(torch.isfinite(ref.cpu()), torch.isfinite(naive))
    torch.testing.assert_close(ref.cpu(), naive, rtol=1e-5, atol=1e-6)


# (group, head_dim, block_size, window, cache dtype, query dtype, pooling, pool_kernel)
CASES = [
    (1, 64, 16, 8, torch.float32, torch.float32, "avg", 7),
    (2, 128, 32, 8, torch.float16, torch.float16, "max", 7),
    (4, 64, 32, 8, torch.bfloat16, torch.bfloat16, "avg", 7),
    (4, 128, 16, 8, torch.bfloat16, torch.bfloat16, "max", 5),
    (8, 64, 16, 8, torch.float16, torch.float16, "avg", 3),
    (2, 64, 16, 3, torch.float32, torch.float32, "max", 1),
    (1, 128, 32, 16, torch.float16, torch.float16, "avg", 7),
    (2, 64, 16, 8, torch.float8_e4m3fn, torch.bfloat16, "max", 7),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_reference(case, paged_kv, device, poison_empty):
    group, head_dim, block_size, window, cache_dtype, query_dtype, pooling, pool_kernel = CASES[
        case
    ]
    num_kv_heads = 2
    paged = paged_kv(
        SEQ_LENS,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=cache_dtype,
        seed=100 + case,
    )
    torch.manual_seed(case)
    query = random_query(len(SEQ_LENS), window, group * num_kv_heads, head_dim, query_dtype, device)
    k_scale = 0.5 if cache_dtype == torch.float8_e4m3fn else 1.0
    kwargs = dict(
        scale=head_dim**-0.5,
        window=window,
        pool_kernel=pool_kernel,
        pooling=pooling,
        k_scale=k_scale,
    )
    out = window_scores(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    assert out.dtype == torch.float32
    assert_scores_match(out, ref, TOLERANCE[query_dtype])


def test_single_long_sequence_uses_many_key_splits(paged_kv, device, poison_empty):
    """One sequence and one KV head: every key tile is its own split in step 1."""
    paged = paged_kv([257], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, seed=7)
    torch.manual_seed(7)
    query = random_query(1, 8, 4, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8)
    out = window_scores(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    ref = window_scores_ref(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
    assert_scores_match(out, ref, TOLERANCE[torch.float32])


def test_nothing_to_score(paged_kv, device):
    """Prompts no longer than the window give zero-width rows."""
    paged = paged_kv(
        [3, 8], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16, seed=1
    )
    query = random_query(2, 8, 4, 64, torch.float16, device)
    out = window_scores(
        query, paged.key_cache, paged.block_table, paged.seq_lens, scale=0.125, window=8
    )
    assert out.shape == (2, 2, 0)


@pytest.mark.parametrize(
    "change, message",
    [(dict(window=4), "window"), (dict(pool_kernel=4), "odd"), (dict(pooling="sum"), "pooling")],
)
@pytest.mark.parametrize("fn", [window_scores, window_scores_ref])
def test_rejects_bad_arguments(fn, change, message, paged_kv, device):
    paged = paged_kv([20], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, seed=2)
    query = random_query(1, 8, 2, 64, torch.float32, device)
    kwargs = dict(scale=0.125, window=8) | change
    with pytest.raises(ValueError, match=message):
        fn(query, paged.key_cache, paged.block_table, paged.seq_lens, **kwargs)
