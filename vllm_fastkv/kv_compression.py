"""Compress a layer's prompt KV in place, right after that layer's attention.

Runs inside the attention layer of the step that completes a prompt: the layer's KV for
the whole prompt is in the paged cache, and the prompt's last ``window`` queries are in
this step's query tensor. Scoring, per-head top-k and tail-aligned compaction
(:mod:`vllm_fastkv.retention`) then leave the selected entries in slots ``[S, T)``.

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
    compact(key_cache, value_cache, batch.block_tables, indices, counts, starts=batch.starts)
