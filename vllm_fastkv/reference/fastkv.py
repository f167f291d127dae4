"""FastKV in plain torch over HF transformers causal LMs: the accuracy oracle.

The forward pass is written out layer by layer instead of calling the HF attention
modules: FastKV needs the per-layer ``Q``/``K`` for scoring, a mid-stack change of
sequence (token-selective propagation) with the original RoPE positions, and a
decode cache whose slots are not positions, and HF's attention and cache APIs
change across versions. Only the stable building blocks are used: the
projections, norms and MLP of each decoder layer, ``model.model.rotary_emb`` and
``lm_head``. Covered families: Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3
(per-head ``q_norm``/``k_norm`` before RoPE).

One prompt at a time (batch 1): this is an oracle, not a server. Budgets and
selection come from :mod:`vllm_fastkv.reference.scoring`; the method and its
defaults are those of ``shared/design/fastkv-algorithm.md``. Keyword arguments
mirror the fields of ``vllm_fastkv.config.FastKVConfig`` (same names, defaults
and budget rounding) so harness code can pass ``config.model_dump()`` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vllm_fastkv.reference.scoring import (
    BudgetMode,
    Pooling,
    causal_attention_probs,
    kv_head_scores,
    repeat_kv,
    select_propagated,
    select_recent,
    select_retained,
    token_budget,
)

#: Rewrites one layer's decode cache ``(layer index, keys, values) -> (keys, values)``
#: before a decode step: how a store other than full precision (low-bit) enters decoding.
KVStore = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: ``fastkv``: scored retention + TSP; ``recency``: keep the last ``B`` tokens of
#: every layer (a StreamingLLM-style baseline without sinks, full prefill);
#: ``full``: keep everything (plain full-KV inference).
Policy = Literal["fastkv", "recency", "full"]


@dataclass(frozen=True)
class LayerKV:
    """What one layer keeps after prefill.

    Attributes:
        indices: ``[num_kv_heads, B]`` ORIGINAL prompt positions of the kept entries,
            sorted per head.
        keys: ``[num_kv_heads, B, head_dim]``, RoPE applied at ``indices``.
        values: ``[num_kv_heads, B, head_dim]``.
        positions: ``[S]`` original positions of the tokens this layer ran over
            (all ``T`` up to the TSP layer, the ``P`` propagated ones after it).
        scores: ``[num_kv_heads, S - w]`` pooled per-KV-head scores of
            ``positions[:S - w]`` (``w = min(window, S)``); ``None`` unless the
            policy is ``fastkv``. Kept for debugging and cross-checks.
    """

    indices: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor | None


@dataclass(frozen=True)
class PrefillResult:
    """Outcome of :func:`fastkv_prefill`.

    Attributes:
        layers: one :class:`LayerKV` per decoder layer.
        tsp_indices: ``[P]`` sorted original positions propagated past the TSP layer,
            or ``None`` when every token propagated (TSP off or ``P == T``).
        logits: ``[vocab]`` fp32 logits of the last prompt token.
        prompt_len: ``T``; decoding continues at RoPE position ``T``.
    """

    layers: list[LayerKV]
    tsp_indices: torch.Tensor | None
    logits: torch.Tensor
    prompt_len: int


def resolve_tsp_layer(tsp_layer: int | None, num_layers: int) -> int:
    """``None`` means the middle of the stack (``num_layers // 2 - 1``), as in FastKVConfig.

    At least one layer must follow the TSP layer, or propagation would save nothing.
    """
    layer = max(num_layers // 2 - 1, 0) if tsp_layer is None else tsp_layer
    if not 0 <= layer < num_layers - 1:
        raise ValueError(
            f"tsp_layer={tsp_layer} is out of range for {num_layers} layers "
            f"(must be in [0, {num_layers - 2}])"
        )
    return layer


@torch.inference_mode()
def fastkv_prefill(
    model: nn.Module,
    input_ids: torch.Tensor | list[int],
    *,
    policy: Policy = "fastkv",
    tsp_layer: int | None = None,
    tsp_rate: float = 0.2,
    retain_rate: float = 0.1,
    window: int = 8,
    pool_kernel: int = 7,
    pooling: Pooling = "avg",
    mode: BudgetMode = "proportional",
    max_capacity_prompt: int = 512,
    tsp_len: int = 2048,
) -> PrefillResult:
    """Prefill one prompt and keep each layer's retained KV.

    Layers ``0..tsp_layer`` run over all ``T`` tokens. Every layer scores its tokens
    with its last ``window`` queries and keeps ``B`` entries per KV head (``B`` from
    the ORIGINAL ``T``, capped by the layer's own sequence length). At ``tsp_layer``
    the ``P`` best tokens (head-summed scores, plus the window) are gathered from
    the layer's output hidden states and only they run through the later layers,
    at their original RoPE positions, causal among themselves in position order.
    ``tsp_rate == 1.0`` disables TSP in both modes (as in ``FastKVConfig``), and so does
    ``tsp_len >= T`` in constant mode.
    ``policy`` (see :data:`Policy`) swaps the selection for a baseline; the
    ``recency`` and ``full`` baselines run the whole prompt through every layer.
    """
    _check_settings(policy, tsp_rate, retain_rate, window, pool_kernel, pooling, mode)
    backbone = model.model
    device = backbone.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, device=device).reshape(-1)
    prompt_len = ids.numel()
    _check_sliding_window(model.config, prompt_len)

    budget = prompt_len
    if policy != "full":
        budget = token_budget(
            prompt_len, mode=mode, rate=retain_rate, capacity=max_capacity_prompt, window=window
        )
    propagate, tsp_at = prompt_len, -1
    if policy == "fastkv" and tsp_rate < 1.0:
        propagate = token_budget(
            prompt_len, mode=mode, rate=tsp_rate, capacity=tsp_len, window=window
        )
        tsp_at = resolve_tsp_layer(tsp_layer, len(backbone.layers))

    positions = torch.arange(prompt_len, device=device)
    hidden = backbone.embed_tokens(ids)
    layers: list[LayerKV] = []
    tsp_indices: torch.Tensor | None = None
    for index, layer in enumerate(backbone.layers):
        seq_len = positions.numel()
        hidden, q, k, v = _decoder_layer(layer, hidden, positions, backbone.rotary_emb)
        scores = None
        if policy == "fastkv":
            scores = kv_head_scores(
                q, k, window=window, pool_kernel=pool_kernel, pooling=pooling,
                scale=_attention_scale(layer.self_attn),
            )
            keep = select_retained(scores, budget, seq_len)
        else:
            keep = select_recent(budget, seq_len, k.shape[0], device=device)
        layers.append(
            LayerKV(
                indices=positions[keep],
                keys=_gather_tokens(k, keep),
                values=_gather_tokens(v, keep),
                positions=positions,
                scores=scores,
            )
        )
        if index == tsp_at and propagate < seq_len:
            chosen = select_propagated(scores, propagate, seq_len)
            hidden, positions = hidden[chosen], positions[chosen]
            tsp_indices = positions

    logits = model.lm_head(backbone.norm(hidden[-1:]))[0].float()
    return PrefillResult(layers=layers, tsp_indices=tsp_indices, logits=logits,
                         prompt_len=prompt_len)


@torch.inference_mode()
def greedy_decode(
    model: nn.Module,
    prefill: PrefillResult,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    kv_store: KVStore | None = None,
) -> torch.Tensor:
    """Greedy tokens on top of the retained cache: ``[n]`` with ``n <= max_new_tokens``.

    The first token is the argmax of the prefill logits. Each new token runs at RoPE
    position ``T, T + 1, ...`` (logical positions continue from the prompt length,
    not from the number of kept entries) and attends to every layer's retained
    entries plus the generated tokens before it. Stops after ``eos_token_id``.
    ``kv_store`` may rewrite each layer's cache before each step (low-bit storage).
    """
    _check_sliding_window(model.config, prefill.prompt_len + max_new_tokens)
    step = _Decoder(model, prefill, kv_store)
    token = prefill.logits.argmax()
    generated = [token]
    while len(generated) < max_new_tokens and token.item() != eos_token_id:
        token = step(token).argmax()
        generated.append(token)
    return torch.stack(generated)


@torch.inference_mode()
def forced_decode_logits(
    model: nn.Module,
    prefill: PrefillResult,
    tokens: torch.Tensor | list[int],
    kv_store: KVStore | None = None,
) -> torch.Tensor:
    """fp32 ``[n, vocab]`` logits that predicted each of ``tokens`` (teacher forcing).

    Row 0 is the prefill's; row ``i`` comes from decoding ``tokens[:i]`` on the retained
    cache, as :func:`greedy_decode` would. Lets a test check that another implementation's
    output is the reference's greedy choice up to numerical ties, without requiring
    bit-identical arithmetic (bf16 kernels, CUDA graphs).
    """
    tokens = torch.as_tensor(tokens).reshape(-1)
    _check_sliding_window(model.config, prefill.prompt_len + tokens.numel())
    step = _Decoder(model, prefill, kv_store)
    rows = [prefill.logits]
    for token in tokens[:-1]:
        rows.append(step(token))
    return torch.stack(rows)


class _Decoder:
    """One-token decode steps on a prefill's retained caches (positions ``T, T+1, ...``)."""

    def __init__(
        self, model: nn.Module, prefill: PrefillResult, kv_store: KVStore | None = None
    ) -> None:
        self.model = model
        self.caches = [(layer.keys, layer.values) for layer in prefill.layers]
        self.position = prefill.prompt_len
        self.kv_store = kv_store

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        backbone = self.model.model
        device = backbone.embed_tokens.weight.device
        hidden = backbone.embed_tokens(token.reshape(1).to(device))
        positions = torch.tensor([self.position], device=device)
        for index, layer in enumerate(backbone.layers):
            if self.kv_store is not None:
                self.caches[index] = self.kv_store(index, *self.caches[index])
            hidden, _, keys, values = _decoder_layer(
                layer, hidden, positions, backbone.rotary_emb, past=self.caches[index]
            )
            self.caches[index] = (keys, values)
        self.position += 1
        return self.model.lm_head(backbone.norm(hidden))[0].float()


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    **settings: Any,
) -> torch.Tensor:
    """:func:`fastkv_prefill` then :func:`greedy_decode`; ``settings`` go to the prefill."""
    prefill = fastkv_prefill(model, input_ids, **settings)
    return greedy_decode(model, prefill, max_new_tokens, eos_token_id)


def _decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    rotary_emb: nn.Module,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm decoder layer over ``hidden`` (``[S, hidden_size]``).

    The ``S`` tokens are the last ones of the attended sequence: ``past`` (decode
    cache, ``[num_kv_heads, L, d]`` each) precedes them. Returns the output hidden
    states, the queries ``[num_q_heads, S, d]`` (for scoring), and the keys and
    values of the whole attended sequence including ``past``.
    """
    attn = layer.self_attn
    q, k, v = _project_qkv(attn, layer.input_layernorm(hidden), positions, rotary_emb)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    probs = causal_attention_probs(q, k, _attention_scale(attn))
    out = torch.matmul(probs, repeat_kv(v, q.shape[0] // v.shape[0]).float())
    out = out.transpose(0, 1).reshape(hidden.shape[0], -1).to(hidden.dtype)
    hidden = hidden + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, q, k, v


def _project_qkv(
    attn: nn.Module, x: torch.Tensor, positions: torch.Tensor, rotary_emb: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head-major ``q``, ``k``, ``v`` (``[heads, S, d]``) with RoPE at ``positions``."""
    head_dim = attn.head_dim
    q = attn.q_proj(x).reshape(x.shape[0], -1, head_dim)
    k = attn.k_proj(x).reshape(x.shape[0], -1, head_dim)
    v = attn.v_proj(x).reshape(x.shape[0], -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head, before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rotary_emb(x.unsqueeze(0), positions.unsqueeze(0))
    cos, sin = cos[0], sin[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF-convention RoPE (halves, not interleaved pairs) on ``[heads, S, d]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _attention_scale(attn: nn.Module) -> float:
    return float(getattr(attn, "scaling", attn.head_dim**-0.5))


def _gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep[h]`` of head ``h``: ``[heads, S, d]`` -> ``[heads, B, d]``."""
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _check_settings(
    policy: str,
    tsp_rate: float,
    retain_rate: float,
    window: int,
    pool_kernel: int,
    pooling: str,
    mode: str,
) -> None:
    """Reject bad knobs up front (scoring would only notice some of them mid-prefill)."""
    if policy not in ("fastkv", "recency", "full"):
        raise ValueError(f"policy must be 'fastkv', 'recency' or 'full', got {policy!r}")
    for name, rate in (("tsp_rate", tsp_rate), ("retain_rate", retain_rate)):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {rate}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd number, got {pool_kernel}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    if mode not in ("proportional", "constant"):
        raise ValueError(f"mode must be 'proportional' or 'constant', got {mode!r}")


def _check_sliding_window(config: Any, total_len: int) -> None:
    """Refuse sequences a sliding-window model would mask: this forward does full attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return
    if getattr(config, "use_sliding_window", True) is False:
        return
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and total_len > sliding:
        raise NotImplementedError(
            f"sequence of {total_len} tokens exceeds the model's sliding window ({sliding}); "
            "the reference implements full attention only"
        )
