"""Long-context task generators: sizing, needle placement, answers, and scoring."""

from __future__ import annotations

import json
import re

import pytest

from vllm_fastkv.reference.tasks import (
    DEFAULT_DATA_DIR,
    MULTI_NEWS,
    TASKS,
    count_tokens,
    niah_multikey,
    niah_multiquery,
    niah_multivalue,
    passkey_retrieval,
    score_exact_match,
    variable_tracking,
)

HAS_MULTI_NEWS = (DEFAULT_DATA_DIR / MULTI_NEWS).is_file()


class WordTokenizer:
    """One token per whitespace-separated word: exact, predictable counts."""

    def encode(self, text: str) -> list[str]:
        return text.split()


def answers(sample) -> list[str]:
    return [sample.answer] if isinstance(sample.answer, str) else sample.answer


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("data_dir", ["default", "missing"])
def test_task_basics(name: str, data_dir: str, tmp_path) -> None:
    kwargs = {} if data_dir == "default" else {"data_dir": tmp_path}
    tokenizer = WordTokenizer()
    sample = TASKS[name](tokenizer, 1500, seed=3, **kwargs)
    prompt, _, meta = sample
    assert meta["task"] == name
    assert meta["num_tokens"] == count_tokens(tokenizer, prompt)
    # Filled up to the budget, at sentence granularity.
    assert 1500 - 120 < meta["num_tokens"] <= 1500
    for _, needle in meta["needles"]:
        assert needle in prompt
    for value in answers(sample):
        assert score_exact_match(prompt, value) == 1.0
    assert prompt.rstrip().endswith(("is", "are", "they are:"))
    assert TASKS[name](tokenizer, 1500, seed=3, **kwargs) == sample, "seeded"
    assert TASKS[name](tokenizer, 1500, seed=4, **kwargs).prompt != prompt
    expected_filler = "multi_news" if data_dir == "default" and HAS_MULTI_NEWS else "generated"
    assert meta["filler"] == expected_filler


@pytest.mark.skipif(not HAS_MULTI_NEWS, reason="LongBench multi_news.jsonl not present")
def test_filler_is_multi_news_text() -> None:
    sample = passkey_retrieval(WordTokenizer(), 800, seed=0)
    contexts = [json.loads(line)["context"] for line in (DEFAULT_DATA_DIR / MULTI_NEWS).open()]
    corpus_words = {word for context in contexts for word in context.split()}
    haystack = sample.prompt.split("\n\n")[1].replace(sample.metadata["needles"][0][1], " ")
    assert set(haystack.split()) <= corpus_words
    assert "NEWLINE_CHAR" not in sample.prompt and "Passage 1:" not in sample.prompt


def test_sizing_with_a_bpe_tokenizer(bpe_tokenizer) -> None:
    sample = niah_multikey(bpe_tokenizer, 3000, seed=1)
    assert sample.metadata["num_tokens"] == len(bpe_tokenizer.encode(sample.prompt).ids)
    assert 2500 < sample.metadata["num_tokens"] <= 3000


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_depth(depth: float, tmp_path) -> None:
    sample = passkey_retrieval(WordTokenizer(), 3000, depth=depth, seed=2, data_dir=tmp_path)
    needle = sample.metadata["needles"][0][1]
    haystack = sample.prompt.split("\n\n")[1]
    assert sample.metadata["filler_sentences"] > 100
    assert abs(haystack.index(needle) / (len(haystack) - len(needle)) - depth) < 0.02


def test_depth_out_of_range() -> None:
    with pytest.raises(ValueError, match="depth"):
        passkey_retrieval(WordTokenizer(), 500, depth=1.5)


def test_budget_too_small() -> None:
    with pytest.raises(ValueError, match="exceed"):
        niah_multiquery(WordTokenizer(), 30)


def test_multikey_distractors() -> None:
    sample = niah_multikey(WordTokenizer(), 1000, num_distractors=5, seed=1)
    keys = sample.metadata["keys"]
    assert len(set(keys)) == 6 and sample.metadata["queried_keys"] == keys[:1]
    found = dict(re.findall(r"magic numbers for (\S+) is: (\d+)\.", sample.prompt))
    assert set(found) == set(keys)
    assert found[keys[0]] == sample.answer
    assert sample.answer not in [found[k] for k in keys[1:]]
    question = sample.prompt.rsplit("\n\n", 1)[1]
    assert keys[0] in question and not any(k in question for k in keys[1:])


def test_multivalue_answer_is_all_values() -> None:
    sample = niah_multivalue(WordTokenizer(), 1000, num_values=4, seed=1)
    key = sample.metadata["keys"][0]
    values = re.findall(rf"magic numbers for {key} is: (\d+)\.", sample.prompt)
    assert sorted(values) == sorted(sample.answer) and len(set(values)) == 4


def test_multiquery_answers_every_key_in_order() -> None:
    sample = niah_multiquery(WordTokenizer(), 1000, num_queries=3, seed=1)
    found = dict(re.findall(r"magic numbers for (\S+) is: (\d+)\.", sample.prompt))
    assert sample.answer == [found[k] for k in sample.metadata["queried_keys"]]


def test_variable_tracking_chain_resolves() -> None:
    sample = variable_tracking(WordTokenizer(), 1500, num_hops=4, num_chains=3, seed=2)
    values: dict[str, str] = {}
    order: list[str] = []
    for name, source in re.findall(r"VAR (\w+) = ((?:VAR \w+)|\d+)\.", sample.prompt):
        # Every reference points to a variable assigned earlier in the text.
        values[name] = values[source[4:]] if source.startswith("VAR ") else source
        order.append(name)
    assert len(values) == 15
    target = sample.metadata["chains"][0]["value"]
    assert f"assigned the value {target}" in sample.prompt
    assert sample.answer == [n for n in order if values[n] == target]
    assert len(sample.answer) == 5
    assert len({c["value"] for c in sample.metadata["chains"]}) == 3


@pytest.mark.parametrize(
    ("prediction", "expected", "score"),
    [
        (" 1234567. The pass key", "1234567", 1.0),
        ("12345678", "1234567", 0.0),
        ("the key is 1234568", "1234567", 0.0),
        ("1111111, 2222222 and more", ["1111111", "2222222", "3333333", "4444444"], 0.5),
        ("ABCDE FGHIJ", ["ABCDE", "FGHIJ"], 1.0),
        ("abcde", "ABCDE", 0.0),
        ("XABCDE", "ABCDE", 0.0),
    ],
)
def test_score_exact_match(prediction: str, expected, score: float) -> None:
    assert score_exact_match(prediction, expected) == score
