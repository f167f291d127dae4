"""The FastKV reference: scoring math against a naive loop, the manual forward against
HF transformers, and the retention / TSP invariants of the method."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference.conftest import ARCHS
from vllm_fastkv.reference import fastkv_prefill, generate, greedy_decode, resolve_tsp_layer
from vllm_fastkv.reference.scoring import (
    kv_head_scores,
    pool_scores,
    select_propagated,
    select_retained,
    token_budget,
)

WINDOW = 8


def random_ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed))


def naive_kv_head_scores(
    q: torch.Tensor, k: torch.Tensor, window: int, kernel: int, pooling: str
) -> torch.Tensor:
    """The method spelled out with Python loops and scalars, independent of scoring.py."""
    num_q_heads, seq_len, head_dim = q.shape
    group = num_q_heads // k.shape[0]
    w = min(window, seq_len)
    n = seq_len - w
    raw = [[0.0] * n for _ in range(num_q_heads)]
    for head in range(num_q_heads):
        for i in range(seq_len - w, seq_len):
            logits = [
                float(q[head, i].double() @ k[head // group, j].double()) / math.sqrt(head_dim)
                for j in range(i + 1)
            ]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j in range(min(n, i + 1)):
                raw[head][j] += exps[j] / total
    radius = kernel // 2
    pooled = []
    for row in raw:
        out = []
        for j in range(n):
            neighbours = [row[t] for t in range(j - radius, j + radius + 1) if 0 <= t < n]
            out.append(sum(neighbours) / kernel if pooling == "avg" else max(neighbours))
        pooled.append(out)
    return torch.tensor(
        [
            [sum(pooled[kv * group + g][j] for g in range(group)) for j in range(n)]
            for kv in range(k.shape[0])
        ],
        dtype=torch.float64,
    ).reshape(k.shape[0], n)


@settings(max_examples=30, deadline=None)
@given(
    num_kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    seq_len=st.integers(1, 24),
    window=st.integers(1, 10),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pooling=st.sampled_from(["avg", "max"]),
    seed=st.integers(0, 2**16),
)
def test_scores_match_naive_loop(
    num_kv_heads: int, group: int, seq_len: int, window: int, kernel: int, pooling: str,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_kv_heads * group, seq_len, 8, generator=gen)
    k = torch.randn(num_kv_heads, seq_len, 8, generator=gen)
    got = kv_head_scores(q, k, window=window, pool_kernel=kernel, pooling=pooling)
    want = naive_kv_head_scores(q, k, window, kernel, pooling)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_max_and_avg_pooling_differ() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 64, 16, generator=gen), torch.randn(2, 64, 16, generator=gen)
    avg = kv_head_scores(q, k, pooling="avg")
    peak = kv_head_scores(q, k, pooling="max")
    assert avg.shape == peak.shape == (2, 64 - WINDOW)
    assert not torch.allclose(avg, peak)
    # Max pooling of non-negative scores dominates the average over the same kernel.
    assert bool((peak >= avg - 1e-7).all())


def test_avg_pooling_counts_padding() -> None:
    pooled = pool_scores(torch.ones(1, 10), kernel=7, pooling="avg")
    torch.testing.assert_close(pooled[0, :4], torch.tensor([4 / 7, 5 / 7, 6 / 7, 1.0]))
    assert pool_scores(torch.ones(1, 10), kernel=7, pooling="max").eq(1.0).all()


def test_even_pool_kernel_rejected() -> None:
    with pytest.raises(ValueError, match="odd"):
        pool_scores(torch.ones(1, 10), kernel=4)


@settings(max_examples=50, deadline=None)
@given(
    heads=st.integers(1, 4),
    candidates=st.integers(0, 40),
    window=st.integers(1, 8),
    extra=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_selection_keeps_window_and_best_scores(
    heads: int, candidates: int, window: int, extra: int, seed: int
) -> None:
    seq_len = candidates + window
    budget = window + extra
    scores = torch.rand(heads, candidates, generator=torch.Generator().manual_seed(seed))
    kept = min(budget, seq_len)
    window_ids = set(range(candidates, seq_len))
    for chosen, row_scores in (
        *zip(select_retained(scores, budget, seq_len), scores, strict=True),
        (select_propagated(scores, budget, seq_len), scores.sum(0)),
    ):
        assert chosen.shape == (kept,)
        assert bool((chosen[1:] > chosen[:-1]).all()), "sorted and unique"
        assert window_ids <= set(chosen.tolist())
        picked = [i for i in chosen.tolist() if i < candidates]
        dropped = sorted(set(range(candidates)) - set(picked))
        if picked and dropped:
            assert row_scores[picked].min() >= row_scores[dropped].max()


def test_token_budget_rules() -> None:
    rules = dict(mode="proportional", capacity=512, window=WINDOW)
    assert token_budget(1000, rate=0.1, **rules) == 100
    assert token_budget(109, rate=0.1, **rules) == 10  # int() floors
    assert token_budget(50, rate=0.1, **rules) == WINDOW  # never below the window
    assert token_budget(5, rate=0.1, **rules) == 5  # never above the prompt
    constant = dict(mode="constant", rate=0.1, window=WINDOW)
    assert token_budget(1000, capacity=64, **constant) == 64
    assert token_budget(40, capacity=64, **constant) == 40


def test_token_budget_agrees_with_project_config() -> None:
    config_module = pytest.importorskip("vllm_fastkv.config")
    for mode in ("proportional", "constant"):
        config = config_module.FastKVConfig(
            mode=mode, retain_rate=0.13, tsp_rate=0.37, max_capacity_prompt=24, tsp_len=40
        )
        for prompt_len in (1, 7, 8, 9, 23, 24, 60, 61, 100, 1234):
            assert config.retention_budget(prompt_len) == token_budget(
                prompt_len, mode=mode, rate=0.13, capacity=24, window=config.window
            )
            assert config.propagation_budget(prompt_len) == token_budget(
                prompt_len, mode=mode, rate=0.37, capacity=40, window=config.window
            )


def test_resolve_tsp_layer() -> None:
    assert resolve_tsp_layer(None, 32) == 15
    assert resolve_tsp_layer(None, 4) == 1
    assert resolve_tsp_layer(2, 4) == 2
    for bad in (3, -1):
        with pytest.raises(ValueError, match="tsp_layer"):
            resolve_tsp_layer(bad, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_kv_matches_hf(model_factory, arch: str) -> None:
    """Validates the hand-written forward: prefill logits and greedy tokens equal HF's."""
    model = model_factory(arch)
    ids = random_ids(40)
    full = fastkv_prefill(model, ids, policy="full")
    with torch.no_grad():
        hf_logits = model(ids[None]).logits[0, -1]
        hf_tokens = model.generate(ids[None], max_new_tokens=12, do_sample=False)[0, 40:]
    torch.testing.assert_close(full.logits, hf_logits, atol=1e-4, rtol=1e-4)
    assert greedy_decode(model, full, 12).tolist() == hf_tokens.tolist()
    assert full.tsp_indices is None
    for layer in full.layers:
        assert torch.equal(layer.indices, torch.arange(40).expand(2, 40))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_retention_without_tsp_equals_full_kv(model_factory, arch: str) -> None:
    model = model_factory(arch)
    ids = random_ids(96)
    full = fastkv_prefill(model, ids, policy="full")
    kept = fastkv_prefill(model, ids, retain_rate=1.0, tsp_rate=1.0)
    assert kept.tsp_indices is None
    for mine, reference in zip(kept.layers, full.layers, strict=True):
        assert torch.equal(mine.indices, reference.indices)
        assert torch.equal(mine.keys, reference.keys)
        assert torch.equal(mine.values, reference.values)
        assert mine.scores is not None and mine.scores.shape == (2, 96 - WINDOW)
    assert torch.equal(kept.logits, full.logits)
    assert torch.equal(greedy_decode(model, kept, 10), greedy_decode(model, full, 10))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_retention_and_tsp_invariants(model_factory, arch: str) -> None:
    model = model_factory(arch)
    prompt_len, tsp_layer = 160, 1
    budget, propagate = 16, 48  # int(0.1 * 160), int(0.3 * 160)
    result = fastkv_prefill(
        model, random_ids(prompt_len), tsp_layer=tsp_layer, tsp_rate=0.3, retain_rate=0.1
    )
    last_window = set(range(prompt_len - WINDOW, prompt_len))

    tsp = result.tsp_indices
    assert tsp is not None and tsp.shape == (propagate,)
    assert bool((tsp[1:] > tsp[:-1]).all())
    assert last_window <= set(tsp.tolist())

    for index, layer in enumerate(result.layers):
        positions = torch.arange(prompt_len) if index <= tsp_layer else tsp
        assert torch.equal(layer.positions, positions)
        assert layer.scores.shape == (2, positions.numel() - WINDOW)
        assert layer.indices.shape == (2, budget)
        assert layer.keys.shape == layer.values.shape == (2, budget, 16)
        for head in layer.indices:
            assert bool((head[1:] > head[:-1]).all())
            assert last_window <= set(head.tolist())
            assert set(head.tolist()) <= set(positions.tolist())
    # Heads choose independently: identical sets everywhere would hint at a shared top-k.
    assert any(not torch.equal(layer.indices[0], layer.indices[1]) for layer in result.layers)


def test_positions_after_tsp_are_original(llama_model) -> None:
    """Kept K/V equal full-KV K/V at the same ORIGINAL position up to layer tsp+1.

    Layers up to the TSP layer see the full prompt, so their K/V are the full run's.
    Layer tsp+1 consumes the gathered hidden states, which are the full run's rows,
    so its K/V also match, but only if RoPE uses the original positions. From layer
    tsp+2 on, the propagated tokens attended to fewer tokens and K/V change.
    """
    prompt_len, tsp_layer = 128, 1
    ids = random_ids(prompt_len, seed=3)
    full = fastkv_prefill(llama_model, ids, policy="full")
    result = fastkv_prefill(llama_model, ids, tsp_layer=tsp_layer, tsp_rate=0.25,
                            retain_rate=0.125)
    for index, (layer, reference) in enumerate(zip(result.layers, full.layers, strict=True)):
        gather = layer.indices.unsqueeze(-1).expand(-1, -1, reference.keys.shape[-1])
        same_keys = torch.gather(reference.keys, 1, gather)
        same_values = torch.gather(reference.values, 1, gather)
        if index <= tsp_layer + 1:
            torch.testing.assert_close(layer.keys, same_keys)
            torch.testing.assert_close(layer.values, same_values)
        else:
            assert not torch.allclose(layer.keys, same_keys, atol=1e-3)


def test_decode_matches_hf_with_evicted_tokens_masked(llama_model) -> None:
    """Decoding on a pruned cache = HF over the whole sequence with evicted keys masked.

    The recency policy evicts the same prompt tokens in every layer and head, which a
    4-D attention mask can express: prompt rows stay causal, generated rows see only
    the kept prompt tokens. HF gets position ids ``0..T+n-2``, so the match also
    checks that decoding continues at RoPE position ``T``, not at the cache size.
    """
    prompt_len, budget, steps = 64, 16, 6
    ids = random_ids(prompt_len, seed=5)
    pruned = fastkv_prefill(llama_model, ids, policy="recency", mode="constant",
                            max_capacity_prompt=budget)
    recent = torch.arange(prompt_len - budget, prompt_len).expand(2, -1)
    assert all(torch.equal(layer.indices, recent) for layer in pruned.layers)
    tokens = greedy_decode(llama_model, pruned, steps)

    sequence = torch.cat([ids, tokens[:-1]])
    total = sequence.numel()
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    allowed[prompt_len:, : prompt_len - budget] = False
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def hf_greedy(positions: torch.Tensor) -> list[int]:
        with torch.no_grad():
            logits = llama_model(sequence[None], attention_mask=mask,
                                 position_ids=positions[None]).logits[0]
        return logits[prompt_len - 1 :].argmax(-1).tolist()

    assert tokens.tolist() == hf_greedy(torch.arange(total))
    # Continuing at the cache size instead of the prompt length changes the output.
    shifted = torch.cat([torch.arange(prompt_len), torch.arange(budget, budget + steps - 1)])
    assert tokens.tolist() != hf_greedy(shifted)
    assert tokens.tolist() != generate(llama_model, ids, steps, policy="full").tolist()


def test_constant_mode_budgets(llama_model) -> None:
    ids = random_ids(100, seed=7)
    result = fastkv_prefill(llama_model, ids, mode="constant", max_capacity_prompt=24,
                            tsp_len=40, tsp_layer=1)
    assert result.tsp_indices is not None and result.tsp_indices.shape == (40,)
    assert all(layer.indices.shape == (2, 24) for layer in result.layers)

    # A budget above the propagated length keeps every propagated token after TSP.
    capped = fastkv_prefill(llama_model, ids, mode="constant", max_capacity_prompt=48,
                            tsp_len=32, tsp_layer=1)
    tsp = capped.tsp_indices
    assert [layer.indices.shape[1] for layer in capped.layers] == [48, 48, 32, 32]
    for layer in capped.layers[2:]:
        assert torch.equal(layer.indices, tsp.expand(2, -1))


@pytest.mark.parametrize("prompt_len", [5, 20])
def test_short_prompt_keeps_everything(llama_model, prompt_len: int) -> None:
    ids = random_ids(prompt_len, seed=9)
    result = fastkv_prefill(llama_model, ids, mode="constant", max_capacity_prompt=64,
                            tsp_len=128)
    assert result.tsp_indices is None
    for layer in result.layers:
        assert torch.equal(layer.indices, torch.arange(prompt_len).expand(2, -1))
    full = fastkv_prefill(llama_model, ids, policy="full")
    assert torch.equal(greedy_decode(llama_model, result, 8), greedy_decode(llama_model, full, 8))


def test_pooling_choice_changes_selection(llama_model) -> None:
    ids = random_ids(200, seed=11)
    avg = fastkv_prefill(llama_model, ids, pooling="avg", tsp_rate=0.3, retain_rate=0.1)
    peak = fastkv_prefill(llama_model, ids, pooling="max", tsp_rate=0.3, retain_rate=0.1)
    assert not torch.equal(avg.tsp_indices, peak.tsp_indices)
    assert any(
        not torch.equal(a.indices, b.indices)
        for a, b in zip(avg.layers, peak.layers, strict=True)
    )


def test_eos_stops_decoding(llama_model) -> None:
    ids = random_ids(32)
    tokens = generate(llama_model, ids, 10, policy="full")
    stop = int(tokens[3])
    first = tokens.tolist().index(stop)
    assert generate(llama_model, ids, 10, policy="full", eos_token_id=stop).tolist() == (
        tokens[: first + 1].tolist()
    )


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (dict(policy="snap"), "policy"),
        (dict(retain_rate=0.0), "retain_rate"),
        (dict(tsp_rate=1.5), "tsp_rate"),
        (dict(pool_kernel=6), "pool_kernel"),
        (dict(pooling="mean"), "pooling"),
        (dict(mode="fixed"), "mode"),
        (dict(window=0), "window"),
        (dict(tsp_layer=3), "tsp_layer"),
    ],
)
def test_bad_settings_rejected(llama_model, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fastkv_prefill(llama_model, random_ids(16), **bad)
