"""Compress a layer's prompt KV in place, right after that layer's attention.

Runs inside the attention layer of the step that completes a prompt: the layer's KV for
the whole prompt is in the paged cache, and the prompt's last ``window`` queries are in
this step's query tensor. Scoring, per-head top-k and tail-aligned compaction
(:mod:`vllm_fastkv.retention`) then leave the selected entries in slots ``[S, T)``. With
mixed precision the evicted entries stay too, in ``[0, S)``: selected entries before
``S`` trade slots with evicted ones at or after it (:func:`_trade_slots`).

On CUDA the Triton kernels of :mod:`vllm_fastkv.kernels` do the work; on CPUs (no Triton
backend) their torch references, which compute the same function.
"""

from __future__ import annotations

import torch

from vllm_fastkv import kernels
from vllm_fastkv.kv_quantization import pack_prompt_pages
from vllm_fastkv.retention_metadata import CompressionBatch


def compress_prompt_kv(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: CompressionBatch,
    *,
    scale: float,
    k_scale: float = 1.0,
    attention_lse: torch.Tensor | None = None,
) -> None:
    """Keep ``batch.budgets[i]`` entries per KV head of each row's prompt, at ``[S, T)``,
    and pack the first ``batch.packed_pages[i]`` low-bit pages of them.

    Args:
        query: ``[num_tokens, num_q_heads, head_dim]``, this step's queries (RoPE applied).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` views
            of the layer's cache (fp8 caches as their fp8 dtype, dequantised by ``k_scale``).
        batch: the rows whose prompt completes in this step.
        scale: the attention's softmax scale.
        attention_lse: ``[num_q_heads, num_tokens]``, the log-sum-exps of this step's
            queries from the layer's FlashAttention (:mod:`vllm_fastkv.attention_lse`), if
            captured: the window rows' softmax normalisers, so scoring reads the keys once.
    """
    if batch.selection != "recency":
        # The recency baseline keeps the last ``T - S`` tokens: already at ``[S, T)``.
        _select_and_compact(query, key_cache, value_cache, batch, scale=scale, k_scale=k_scale,
                            attention_lse=attention_lse)  # fmt: skip
    if any(batch.packed_pages):
        pack_prompt_pages(key_cache, value_cache, batch.block_tables, batch.starts_host,
                          batch.packed_pages, batch.layout)  # fmt: skip


def _select_and_compact(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: CompressionBatch,
    *,
    scale: float,
    k_scale: float,
    attention_lse: torch.Tensor | None,
) -> None:
    """Score, select and compact each row's kept entries into ``[S, T)``."""
    window = batch.window
    window_rows = batch.query_ends[:, None] + torch.arange(-window, 0, device=query.device)
    window_queries = query[window_rows]  # [n, w, heads, dim]
    common = dict(scale=scale, window=window, pool_kernel=batch.pool_kernel,
                  pooling=batch.pooling, k_scale=k_scale)  # fmt: skip
    if attention_lse is not None:
        common["lse"] = attention_lse[:, window_rows].permute(1, 2, 0)  # [n, w, heads]
    if key_cache.is_cuda:
        # Lengths and budgets from the host: no device sync in any layer.
        scores = kernels.window_scores(
            window_queries, key_cache, batch.block_tables, batch.scored_lens,
            max_seq_len=max(batch.scored_lens_host), **common,
        )  # fmt: skip
        indices, counts = kernels.select_retained(
            scores, batch.scored_lens_host, batch.budgets, window
        )
        compact = kernels.compact_kv
    else:
        scores = kernels.window_scores_ref(
            window_queries, key_cache, batch.block_tables, batch.scored_lens, **common
        )
        indices, counts = kernels.select_retained_ref(
            scores, batch.scored_lens, torch.tensor(batch.budgets), window
        )
        compact = kernels.compact_kv_ref
    batch.scores = scores
    if batch.keeps_evicted:
        _trade_slots(key_cache, value_cache, batch.block_tables, indices, counts,
                     batch.scored_lens.long() - counts)  # fmt: skip
    else:
        compact(key_cache, value_cache, batch.block_tables, indices, counts, starts=batch.starts)


def _trade_slots(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    ends: torch.Tensor,
) -> None:
    """Mixed precision's layout, in place: per row and KV head, the ``i``-th selected
    entry before ``S`` (``ends``) and the ``i``-th evicted entry at or after ``S`` (both in
    ascending order; there are as many of each) exchange slots, so that ``[S, T)`` holds
    the ``T - S`` selected entries and ``[0, S)`` the evicted ones.

    ``indices``: ``[n, heads, width]`` selected positions, ascending per head and ``-1``
    padded past ``counts[s] = T - S``. No two pairs share a slot, so every pair is
    exchanged at once (torch gathers and scatters, on the device: no sync, no staging);
    the other lanes exchange a slot that no pair touches with itself (a selected entry
    that stays, or for padding the last prompt token, which is always selected).
    """
    n, heads, width = indices.shape
    if width == 0:
        return
    lane = torch.arange(width, device=indices.device)
    ends = ends[:, None, None]
    in_count = lane < counts[:, None, None]
    # Lane i's first slot: the i-th selected entry, or for padding the last prompt token
    # (T - 1 = S + count - 1: selected in every head, never moved).
    a = torch.where(in_count, indices, ends + counts[:, None, None] - 1)
    before = (indices < ends) & in_count
    moving = before.sum(dim=2, keepdim=True)
    # Slots S + j (j < count) holding a selected entry sort after the free ones.
    taken = torch.zeros(n, heads, width + 1, dtype=torch.bool, device=indices.device)
    offsets = torch.where(in_count & ~before, indices - ends, width)
    taken.scatter_(2, offsets, True)
    taken = taken[..., :width] | ~in_count
    free = (lane + width * taken).argsort(dim=2)
    b = torch.where(lane < moving, ends + free, a)
    page = key_cache.shape[1]
    head = torch.arange(heads, device=indices.device)[None, :, None].expand_as(a)
    rows = torch.arange(n, device=indices.device)[:, None, None]
    block_a = block_tables[rows, a // page].long()
    block_b = block_tables[rows, b // page].long()
    for cache in (key_cache, value_cache):
        raw = cache.view(_RAW[cache.element_size()])
        at_a = raw[block_a, a % page, head]
        at_b = raw[block_b, b % page, head]
        raw[block_a, a % page, head] = at_b
        raw[block_b, b % page, head] = at_a


#: Same-width integers: slots move as raw bits, whatever the cache dtype (fp8 included).
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
