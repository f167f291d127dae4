"""Paged attention in plain torch: the FASTKV backend's path on CPUs.

It reads and writes vLLM's paged KV cache in exactly the layout the GPU path uses
(``TritonAttentionBackend``'s ``(num_blocks, num_kv_heads, block_size, 2 * head_size)``
logical shape), so KV retention and compaction run the same code on both platforms.
It favours clarity over speed: one dense attention per sequence, softmax in fp32.
"""

from __future__ import annotations

import torch


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``[num_blocks, block_size, num_kv_heads, head_size]`` of the K and V halves."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def write_paged_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ([num_tokens, num_kv_heads, head_size]) at their slots.

    Slots are ``block * block_size + offset``; negative slots mark padding tokens
    (vLLM pads batches for graph capture) and are skipped.
    """
    num_tokens = key.shape[0]
    slots = slot_mapping[:num_tokens].long()
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, offsets] = value.to(value_cache.dtype)


def gather_sequence_kv(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` logical tokens of one sequence: [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table_row[:num_blocks].long()
    gathered = cache[blocks]
    return gathered.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    sliding_window_left: int = -1,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached tokens.

    ``query``/``output``: [num_tokens, num_heads, head_size], packed by
    ``query_start_loc``; sequence ``i`` has ``seq_lens[i]`` tokens in the cache, the
    last ``q_len`` of which are its queries. ``sliding_window_left >= 0`` limits each
    query to that many earlier keys; ``softcap > 0`` applies ``softcap * tanh(s / softcap)``.
    """
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = gather_sequence_kv(key_cache, block_table[i], seq_len).float()
        values = gather_sequence_kv(value_cache, block_table[i], seq_len).float()
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        q = query[q_start:q_end].float().transpose(0, 1)
        scores = torch.matmul(q, keys.transpose(1, 2)) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window_left >= 0:
            allowed &= k_pos >= q_pos - sliding_window_left
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values).transpose(0, 1)
        output[q_start:q_end] = out.to(output.dtype)
    return output
