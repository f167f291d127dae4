"""FastKV scoring and selection math on dense per-sequence tensors.

Everything here is pure tensor math with no model in sight, so the same functions
serve the layer-by-layer reference in :mod:`vllm_fastkv.reference.fastkv`, the
accuracy harness, and tests that compare production kernels against them. Shapes
follow one sequence of one layer, RoPE already applied:

* ``q``: ``[num_q_heads, T, d]``
* ``k``: ``[num_kv_heads, T, d]``

Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)`` (the GQA
layout of HF transformers and vLLM). Steps and defaults follow
``shared/design/fastkv-algorithm.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["avg", "max"]
BudgetMode = Literal["proportional", "constant"]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand ``[num_kv_heads, T, d]`` to ``[num_kv_heads * n_rep, T, d]`` in GQA order."""
    return x.repeat_interleave(n_rep, dim=0)


def causal_attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """fp32 ``softmax(q @ k^T * scale)`` for queries that are the LAST ``Lq`` keys.

    Query ``i`` sits at key index ``i + Lk - Lq`` and may see keys up to that index.
    One rule covers full causal prefill (``Lq == Lk``), the observation window
    (``Lq == window``: causal only inside the last ``window x window`` block) and
    decoding (``Lq == 1``: no mask at all). Returns ``[num_q_heads, Lq, Lk]``.
    """
    num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len, _ = k.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if q_len > k_len:
        raise ValueError(f"{q_len} queries cannot be the last positions of {k_len} keys")
    scale = head_dim**-0.5 if scale is None else scale
    keys = repeat_kv(k, num_q_heads // num_kv_heads).float()
    logits = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def window_scores(
    q: torch.Tensor, k: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """Attention mass the last ``window`` queries put on each earlier token.

    Steps 1-2 of the method: the window queries attend over all ``T`` keys, and the
    probabilities are summed over those queries for the ``T - w`` tokens before the
    window (the window itself is always kept, so it is never scored). ``w`` is
    ``min(window, T)``, so a prompt no longer than the window yields no candidates.
    Returns fp32 ``[num_q_heads, T - w]``.
    """
    seq_len = k.shape[1]
    w = min(window, seq_len)
    probs = causal_attention_probs(q[:, seq_len - w :], k, scale)
    return probs[:, :, : seq_len - w].sum(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int = 7, pooling: Pooling = "avg") -> torch.Tensor:
    """1-D pooling along tokens (stride 1, 'same' padding) of ``[heads, N]`` scores.

    Pooling spreads a token's importance to its neighbours, so selection keeps short
    spans instead of isolated tokens. Average pooling counts padding as zeros
    (``count_include_pad=True``, as in ``F.avg_pool1d``); max pooling ignores it.
    The kernel must be odd for the output to keep ``N`` entries.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel must be a positive odd number, got {kernel}")
    if scores.shape[-1] == 0 or kernel == 1:
        return scores
    x = scores.unsqueeze(1)
    if pooling == "avg":
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    elif pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    return pooled.squeeze(1)


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum ``[num_q_heads, N]`` scores over each KV head's query group -> ``[num_kv_heads, N]``.

    A KV entry serves every query head of its group, so its importance is their sum.
    """
    num_q_heads, n = scores.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    return scores.reshape(num_kv_heads, num_q_heads // num_kv_heads, n).sum(dim=1)


def kv_head_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int = 8,
    pool_kernel: int = 7,
    pooling: Pooling = "avg",
    scale: float | None = None,
) -> torch.Tensor:
    """Per-KV-head importance of the tokens before the window: ``[num_kv_heads, T - w]``.

    This single score drives both KV retention (per head) and TSP (summed over heads).
    """
    pooled = pool_scores(window_scores(q, k, window, scale), pool_kernel, pooling)
    return group_scores(pooled, k.shape[0])


def token_budget(
    prompt_len: int, *, mode: BudgetMode, rate: float, capacity: int, window: int
) -> int:
    """Tokens to keep out of ``prompt_len``: ``int(rate * prompt_len)`` or ``capacity``.

    ``int`` (floor) is the rounding; ``FastKVConfig.retention_budget`` /
    ``propagation_budget`` call this. The budget never drops below the observation window
    (the window is always kept) and never exceeds the prompt (short prompts keep
    everything). Used for the retention budget ``B`` (rate ``retain_rate``,
    capacity ``max_capacity_prompt``) and the TSP budget ``P`` (``tsp_rate``,
    ``tsp_len``).
    """
    if mode == "proportional":
        budget = int(rate * prompt_len)
    elif mode == "constant":
        budget = capacity
    else:
        raise ValueError(f"mode must be 'proportional' or 'constant', got {mode!r}")
    return min(prompt_len, max(budget, window))


def select_retained(scores: torch.Tensor, budget: int, seq_len: int) -> torch.Tensor:
    """Per-head top tokens plus the observation window, sorted: ``[heads, min(budget, seq_len)]``.

    ``scores`` (``[heads, N]``) covers the first ``N`` of ``seq_len`` tokens; the
    remaining ``seq_len - N`` are the window and are always kept, so each head keeps
    its ``budget - (seq_len - N)`` best-scored tokens besides them. Indices are
    local to the ``seq_len`` tokens the scores were computed over.
    """
    heads, n = scores.shape
    window = seq_len - n
    if budget >= seq_len:
        return torch.arange(seq_len, device=scores.device).expand(heads, seq_len)
    if budget < window:
        raise ValueError(f"budget {budget} cannot hold the {window}-token observation window")
    top = scores.topk(budget - window, dim=-1).indices
    recent = torch.arange(n, seq_len, device=scores.device).expand(heads, window)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


def select_propagated(scores: torch.Tensor, budget: int, seq_len: int) -> torch.Tensor:
    """TSP selection: top tokens by head-summed score plus the window, sorted: ``[P]``.

    All heads must agree on one token set because whole hidden states propagate.
    """
    return select_retained(scores.sum(dim=0, keepdim=True), budget, seq_len)[0]


def select_recent(
    budget: int, seq_len: int, heads: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The recency baseline: the last ``min(budget, seq_len)`` tokens for every head."""
    keep = min(budget, seq_len)
    return torch.arange(seq_len - keep, seq_len, device=device).expand(heads, keep)
