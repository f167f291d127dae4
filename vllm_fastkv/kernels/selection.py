"""Token selection for KV retention and token-selective propagation (batched torch).

One ``torch.topk`` over the whole padded batch ``[num_seqs, heads, width]`` with the
largest per-sequence ``k``; since ``topk`` returns scores in descending order, each
sequence's top ``k_s`` are the first ``k_s`` columns, so ragged budgets cost one call,
not a loop. The selection is tiny next to scoring (it reads scores, not the KV cache);
``benchmarks/bench_kernels.py`` times it at 128K tokens to confirm.

Output shapes depend on the lengths and budgets, so they are needed on the host. The
serving path knows them there: given as lists (or CPU tensors) they cost no device sync,
and the few derived integers go to the device in one non-blocking copy from pinned
memory. CUDA tensors still work, at the price of one sync.

Semantics: :func:`vllm_fastkv.kernels.reference.select_retained_ref`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_fastkv.kernels.reference import kept_count

IntVector = torch.Tensor | Sequence[int]


def _host_ints(seq_lens: IntVector, budgets: IntVector) -> tuple[list[int], list[int]]:
    """Both vectors as host lists: free for lists and CPU tensors; CUDA tensors come over
    in one copy (one device sync)."""
    vectors = (seq_lens, budgets)
    if any(isinstance(v, torch.Tensor) and v.dim() != 1 for v in vectors):
        raise ValueError("seq_lens and budgets must both be [num_seqs]")
    if all(isinstance(v, torch.Tensor) for v in vectors):
        lens, buds = torch.stack([seq_lens.long(), budgets.to(seq_lens.device).long()]).tolist()
    else:
        lens, buds = (v.tolist() if isinstance(v, torch.Tensor) else [*map(int, v)]
                      for v in vectors)  # fmt: skip
    return lens, buds


def select_retained(
    scores: torch.Tensor, seq_lens: IntVector, budgets: IntVector, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-head kept tokens: top ``B - window`` scored ones plus the last ``window``.

    Args:
        scores: fp32 ``[num_seqs, heads, width]`` from :func:`window_scores`; entries at
            or past ``T_s - window`` are ignored.
        seq_lens: ``[num_seqs]`` prompt lengths ``T``.
        budgets: ``[num_seqs]`` budgets ``B`` (raised to ``window`` if below it).
            Pass both as host lists (or CPU tensors) to avoid a device sync.
        window: observation window, always kept.

    Returns:
        ``(indices, counts)``: int64 ``[num_seqs, heads, max(counts)]`` token indices,
        sorted ascending per head and ``-1`` padded, and int64 ``counts[s] =
        min(max(B, window), T)``. A sequence with ``T <= B`` keeps ``0 .. T-1``.
    """
    num_seqs, heads, width = scores.shape
    device = scores.device
    lens, buds = _host_ints(seq_lens, budgets)
    if len(lens) != num_seqs or len(buds) != num_seqs:
        raise ValueError("seq_lens and budgets must both be [num_seqs]")
    if num_seqs == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty.view(0, heads, 0), empty
    # The per-sequence bookkeeping is a few host integers; the derived ones go to the
    # device in one copy, instead of a dozen tiny GPU ops.
    counts = [kept_count(t, b, window) for t, b in zip(lens, buds)]
    recent = [min(t, window) for t in lens]  # a prompt shorter than the window is all window
    num_top = [c - r for c, r in zip(counts, recent)]
    keep_all = [c == t for c, t in zip(counts, lens)]
    sentinel = width + window  # above every real index: sorts last, becomes the -1 padding
    last = [[t - r + i if i < r else sentinel for i in range(window)] for t, r in zip(lens, recent)]
    # Rows: T - w, top-k, keep-all flag, count, then the window positions. From pinned
    # memory the copy is asynchronous (the caching host allocator keeps the buffer alive
    # until it is done).
    params = torch.tensor(
        [[t - window for t in lens], num_top, keep_all, counts, *zip(*last)],
        dtype=torch.long,
        pin_memory=device.type == "cuda",
    ).to(device, non_blocking=True)
    max_top = max(num_top)

    # Only tokens before each sequence's window compete, whatever the padding holds.
    padding = torch.arange(width, device=device) >= params[0, :, None, None]
    candidates = scores.masked_fill(padding, float("-inf"))
    ragged = len(set(num_top)) > 1  # then each row takes a prefix of a score-sorted top-k
    top = candidates.topk(max_top, dim=-1, sorted=ragged).indices
    cols = torch.arange(max_top, device=device)
    if any(keep_all):  # keeping everything must not depend on score values (ties, NaN)
        top = torch.where(params[2, :, None, None].bool(), cols, top)
    if ragged:
        top = top.masked_fill(cols >= params[1, :, None, None], sentinel)

    kept = torch.cat([top, params[4:].T[:, None, :].expand(num_seqs, heads, window)], dim=-1)
    kept = kept.sort(dim=-1).values[..., : max(counts)]
    return kept.masked_fill(kept == sentinel, -1), params[3]


def select_propagated(
    scores: torch.Tensor, seq_lens: IntVector, keep: IntVector, window: int
) -> torch.Tensor:
    """TSP selection: one token set per sequence from the KV-head-summed scores.

    All heads must agree because whole hidden states propagate. Returns int64
    ``[num_seqs, max kept]`` sorted ascending and ``-1`` padded; sequence ``s`` keeps
    ``min(max(P_s, window), T_s)`` tokens. ``seq_lens``/``keep`` as in
    :func:`select_retained` (host lists: no device sync).
    """
    return select_retained(scores.sum(dim=1, keepdim=True), seq_lens, keep, window)[0][:, 0]
