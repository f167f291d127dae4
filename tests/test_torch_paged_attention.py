"""The CPU attention path against dense attention on the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_fastkv.torch_paged_attention import (
    gather_sequence_kv,
    paged_attention,
    split_kv_cache,
    write_paged_kv,
)


def _paged_batch(seq_lens, q_lens, num_kv_heads, group, head_size, block_size, dtype, seed):
    """Random K/V for each sequence written to a shuffled paged cache, plus queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    kv_cache = torch.full(
        (num_blocks, num_kv_heads, block_size, 2 * head_size), float("nan"), dtype=dtype
    )
    key_cache, value_cache = split_kv_cache(kv_cache, head_size)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    dense_k, dense_v, slots = [], [], []
    used = 0
    for i, n in enumerate(seq_lens):
        table = perm[used : used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        block_table[i, : len(table)] = table
        pos = torch.arange(n)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        dense_k.append(torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype))
        dense_v.append(torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype))
    # Padding tokens (slot -1) must be ignored by the cache write.
    keys = torch.cat(dense_k + [torch.randn(2, num_kv_heads, head_size).to(dtype)])
    values = torch.cat(dense_v + [torch.randn(2, num_kv_heads, head_size).to(dtype)])
    slot_mapping = torch.cat(slots + [torch.tensor([-1, -1])])
    write_paged_kv(keys, values, key_cache, value_cache, slot_mapping)
    queries = [
        torch.randn(q, num_kv_heads * group, head_size, generator=gen).to(dtype) for q in q_lens
    ]
    return key_cache, value_cache, block_table, dense_k, dense_v, queries


def _dense_attention(q, k, v, scale, window_left):
    n, q_len = k.shape[0], q.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q_pos = torch.arange(n - q_len, n)[:, None]
    k_pos = torch.arange(n)[None, :]
    mask = k_pos <= q_pos
    if window_left >= 0:
        mask &= k_pos >= q_pos - window_left
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window_left", [-1, 20])
def test_paged_attention_matches_dense(dtype, group, block_size, window_left):
    seq_lens, q_lens = [1, 37, 64, 130], [1, 37, 5, 1]  # prefill, chunked prefill, decode
    kc, vc, table, ks, vs, qs = _paged_batch(seq_lens, q_lens, 2, group, 64, block_size, dtype, 7)
    for i, n in enumerate(seq_lens):
        assert torch.equal(gather_sequence_kv(kc, table[i], n), ks[i])
        assert torch.equal(gather_sequence_kv(vc, table[i], n), vs[i])
    query = torch.cat(qs)
    output = torch.full_like(query, float("nan"))
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    scale = 64**-0.5
    paged_attention(
        query, kc, vc, table, starts, torch.tensor(seq_lens), scale, output,
        sliding_window_left=window_left,
    )
    ref = torch.cat([_dense_attention(q, k, v, scale, window_left) for q, k, v in zip(qs, ks, vs)])
    assert not output.isnan().any()
    rel = (output.float() - ref).norm() / ref.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2)
