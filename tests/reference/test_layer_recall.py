"""benchmarks/accuracy/layer_recall.py: a retention-only prefill's per-layer scores rank
exactly what TSP at that layer propagates, and answers are found as prompt tokens."""

from __future__ import annotations

import pytest
import torch

from benchmarks.accuracy.layer_recall import answer_positions, layer_recalls
from vllm_fastkv.reference import fastkv_prefill

WINDOW, TSP_RATE, RETAIN_RATE = 4, 0.25, 0.2


class CharTokenizer:
    """One id per character: a leading space is its own token, as before Qwen2's digits."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_answer_positions_finds_every_value_and_occurrence():
    tok = CharTokenizer()
    ids = tok.encode("key 12 is 345. again 345! and 6")
    assert answer_positions(ids, "345", tok) == [10, 11, 12, 21, 22, 23]
    assert answer_positions(ids, ["12", "6"], tok) == [4, 5, 30]
    assert answer_positions(ids, "789", tok) == []


def test_answer_positions_falls_back_to_a_leading_space():
    """A tokenizer that only knows " 345" as one token (a merged leading space)."""

    class MergingTokenizer(CharTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [1000] if text == " 345" else [2000] if text == "345" else super().encode(text)

    ids = [5, 1000, 7, 1000]
    assert answer_positions(ids, "345", MergingTokenizer()) == [1, 3]


@pytest.mark.parametrize("tsp_layer", [0, 1, 2])
def test_recall_of_tsp_indices_is_one_at_their_layer(qwen2_model, tsp_layer):
    """What TSP at layer l propagates (a real TSP prefill) is exactly the top-P set the
    retention-only prefill's layer l ranks: recall 1 there, and the window is kept in
    every layer by both selections."""
    torch.manual_seed(tsp_layer)
    ids = torch.randint(1, 512, (96,)).tolist()
    tsp = fastkv_prefill(qwen2_model, ids, tsp_layer=tsp_layer, tsp_rate=TSP_RATE,
                         retain_rate=RETAIN_RATE, window=WINDOW)  # fmt: skip
    retention = fastkv_prefill(qwen2_model, ids, tsp_rate=1.0, retain_rate=RETAIN_RATE,
                               window=WINDOW)  # fmt: skip
    propagated = tsp.tsp_indices.tolist()
    recalls = layer_recalls(retention, propagated, tsp_rate=TSP_RATE)
    assert len(recalls) == len(retention.layers)
    assert recalls[tsp_layer]["tsp"] == 1.0
    # Each head keeps int(0.2 * 96) = 19 of the 24 propagated positions at most.
    assert 0.0 < recalls[tsp_layer]["retain"] <= 19 / len(propagated)
    window = list(range(len(ids) - WINDOW, len(ids)))
    for recall in layer_recalls(retention, window, tsp_rate=TSP_RATE):
        assert recall == {"tsp": 1.0, "retain": 1.0}


def test_layer_recalls_refuses_a_prefill_with_tsp(qwen2_model):
    ids = list(range(1, 97))
    tsp = fastkv_prefill(qwen2_model, ids, tsp_layer=1, tsp_rate=TSP_RATE,
                         retain_rate=RETAIN_RATE, window=WINDOW)  # fmt: skip
    with pytest.raises(ValueError, match="retention-only"):
        layer_recalls(tsp, [0], tsp_rate=TSP_RATE)
