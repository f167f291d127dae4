"""The shipped retrieval model (benchmarks/accuracy/retriever) through vLLM on CPU.

Trained by ``train_retriever.py`` (docs/ACCURACY.md), it answers passkey questions of
~2,000 tokens with full KV at every needle depth, so this checks the weights that ship
and their build into an HF directory as vLLM loads them, not only random models. With
retention at 20% the same model loses the key (docs/ACCURACY.md: in most of its layers
the window's scores keep none of the needle's digits), so the retention run is checked
against what it must equal, the torch reference's greedy tokens on the same compressed
cache, and for really compressing. Two engines of
a 7M-parameter model, ~1 minute on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.engines import generate
from tests.e2e.reference_check import ENGINE, assert_matches_reference
from vllm_fastkv.reference.tasks import passkey_retrieval, score_exact_match

PROMPT_TOKENS = 2000
DEPTHS = (0.1, 0.5, 0.9)
MAX_TOKENS = 10
#: No such directory: the task generator falls back to its generated filler sentences.
NO_DATA = Path("/nonexistent-fastkv-data")
RETENTION = {"retain_rate": 0.2, "tsp_rate": 1.0}
LONG_ENGINE = dict(ENGINE, max_model_len=2048 + MAX_TOKENS, max_num_batched_tokens=1024)


def _prompts(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [
        passkey_retrieval(tokenizer, PROMPT_TOKENS, depth=depth, seed=seed, data_dir=NO_DATA)
        for seed, depth in enumerate(DEPTHS)
    ]
    return tokenizer, samples, [tokenizer.encode(s.prompt) for s in samples]


def test_retriever_finds_the_key_and_retention_matches_the_reference(retriever: Path):
    tokenizer, samples, prompts = _prompts(retriever)
    assert all(1900 <= len(ids) <= 2048 for ids in prompts), [len(ids) for ids in prompts]

    full = generate(retriever, prompts, MAX_TOKENS,
                    additional_config={"fastkv": {"enabled": False}}, **LONG_ENGINE)  # fmt: skip
    replies = [tokenizer.decode(t, skip_special_tokens=True) for t in full["tokens"]]
    assert [score_exact_match(r, s.answer) for r, s in zip(replies, samples)] == [1.0] * 3, (
        replies
    )

    kept = generate(retriever, prompts, MAX_TOKENS, additional_config={"fastkv": RETENTION},
                    **LONG_ENGINE)  # fmt: skip
    sched = kept["scheduler"]
    assert sched["compressed_prompts"] == len(prompts)
    assert sched["kept_tokens"] < 0.3 * sum(len(ids) for ids in prompts)
    assert_matches_reference(retriever, prompts, [RETENTION] * len(prompts), kept["tokens"])
