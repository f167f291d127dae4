"""Seeded offline long-context tasks: passkey, needle-in-a-haystack, variable tracking.

KV compression fails in a recognisable way: it evicts the one sentence the question
is about. Synthetic retrieval tasks in the style of RULER measure exactly that, at
any context length and needle depth, with no dataset download and no judge model.
Each generator returns a :class:`TaskSample` ``(prompt, answer, metadata)``; the
prompt ends with an answer prefix so that a base model continues with the answer,
and :func:`score_exact_match` checks the continuation.

The haystack is English news text (the ``context`` fields of LongBench
``multi_news.jsonl``) when the data directory has it, so the filler looks like the
long documents the method is evaluated on; otherwise seeded generated sentences
(recorded in ``metadata["filler"]``). The prompt is sized with the caller's
tokenizer (any object with ``encode(text)`` returning ids or an object with
``.ids``) to at most ``target_tokens`` tokens.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

#: ``../shared/data`` relative to the repository root (this file is
#: ``<root>/vllm_fastkv/reference/tasks.py``).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MULTI_NEWS = Path("longbench") / "multi_news.jsonl"

_ADJECTIVES = (
    "amber brave calm silent golden hidden lucky misty noble quiet rapid rusty scarlet "
    "shiny steady swift tidy velvet vivid wild bitter cosmic dusty frozen gentle hollow"
).split()
_NOUNS = (
    "harbor falcon lantern meadow orchard pebble quarry river saddle tiger violin walnut "
    "anchor beacon canyon dragon ember forest glacier hammer island jungle kettle mirror"
).split()
_FILLER_SUBJECTS = (
    "the council|the market|a river trust|the school board|the company|the city"
).split("|")
_FILLER_VERBS = "reported announced expected discussed reviewed described approved".split()
_FILLER_OBJECTS = (
    "a new plan|the annual budget|several changes|the latest figures|a long delay|"
    "the weather outlook|a public meeting|the final decision|a modest increase"
).split("|")
_FILLER_TAILS = (
    "on Monday|after a long debate|for the coming year|despite some concerns|"
    "with little notice|in a brief statement|according to local officials"
).split("|")


class Tokenizer(Protocol):
    """Anything that turns text into token ids (HF tokenizers, ``tokenizers.Tokenizer``)."""

    def encode(self, text: str) -> Any: ...


class TaskSample(NamedTuple):
    """One task instance.

    ``answer`` is a list when every listed value must appear in the prediction
    (several values or several queries), else a single string.
    """

    prompt: str
    answer: str | list[str]
    metadata: dict[str, Any]


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of ids ``tokenizer.encode(text)`` yields (list-like or ``Encoding.ids``)."""
    encoded = tokenizer.encode(text)
    return len(getattr(encoded, "ids", encoded))


def score_exact_match(prediction: str, expected: str | Sequence[str]) -> float:
    """Fraction of expected values that appear verbatim, as whole words, in ``prediction``.

    A generated continuation carries more than the answer (punctuation, a repeated
    phrase), so a value counts when it occurs delimited by non-alphanumerics, as in
    RULER's string-match scoring; matching is case-sensitive. A single answer
    scores 0.0 or 1.0.
    """
    values = [expected] if isinstance(expected, str) else list(expected)
    if not values:
        raise ValueError("expected answer is empty")
    hits = sum(
        re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", prediction) is not None
        for value in values
    )
    return hits / len(values)


def passkey_retrieval(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """The classic passkey test: one 7-digit key at ``depth`` of the haystack."""
    rng = random.Random(f"passkey:{seed}")
    key = _numbers(rng, 1)[0]
    return _assemble(
        "passkey", tokenizer, target_tokens, rng, seed, data_dir,
        prefix=(
            "There is an important piece of information hidden inside a lot of irrelevant "
            "text. Find it and memorize it. I will quiz you about it.\n\n"
        ),
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
        question="\n\nWhat is the pass key? The pass key is",
        answer=key,
        extra={"depth": depth},
    )


def niah_single(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """Needle in a haystack: one key with one magic number at ``depth``."""
    return _magic_numbers("niah_single", tokenizer, target_tokens, depth, seed, data_dir,
                          num_keys=1, values_per_key=1, num_queries=1)


def niah_multikey(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    num_distractors: int = 3,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """One queried needle at ``depth`` among distractor needles with other keys."""
    return _magic_numbers("niah_multikey", tokenizer, target_tokens, depth, seed, data_dir,
                          num_keys=1 + num_distractors, values_per_key=1, num_queries=1)


def niah_multivalue(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    num_values: int = 4,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """One key with ``num_values`` magic numbers; the answer is all of them."""
    return _magic_numbers("niah_multivalue", tokenizer, target_tokens, depth, seed, data_dir,
                          num_keys=1, values_per_key=num_values, num_queries=1)


def niah_multiquery(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    num_queries: int = 4,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """``num_queries`` keys, all asked for at once; the answer is their values in order."""
    return _magic_numbers("niah_multiquery", tokenizer, target_tokens, depth, seed, data_dir,
                          num_keys=num_queries, values_per_key=1, num_queries=num_queries)


def variable_tracking(
    tokenizer: Tokenizer,
    target_tokens: int,
    *,
    depth: float = 0.5,
    num_hops: int = 4,
    num_chains: int = 2,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> TaskSample:
    """Multi-hop tracing: ``VAR A = 12345.``, then ``VAR B = VAR A.`` ... ``num_hops`` times.

    The queried chain starts at ``depth`` and its assignments follow in order at
    seeded depths in ``[depth, 1]``; ``num_chains - 1`` distractor chains (other
    values, other names) are spread over the whole haystack. The answer is every
    variable of the queried chain, in assignment order.
    """
    if num_hops < 1 or num_chains < 1:
        raise ValueError(f"need num_hops >= 1 and num_chains >= 1, got {num_hops}, {num_chains}")
    rng = random.Random(f"variable_tracking:{seed}")
    values = _numbers(rng, num_chains, digits=5)
    names = _distinct(num_chains * (num_hops + 1),
                      lambda: "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)))
    needles: list[tuple[float, str]] = []
    chains = []
    for chain in range(num_chains):
        chain_names = names[chain * (num_hops + 1) : (chain + 1) * (num_hops + 1)]
        start = depth if chain == 0 else rng.random()
        depths = [start, *sorted(rng.uniform(start, 1.0) for _ in range(num_hops))]
        statements = [f"VAR {chain_names[0]} = {values[chain]}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain_names)]
        needles += zip(depths, statements, strict=True)
        chains.append({"value": values[chain], "names": chain_names})
    value = values[0]
    return _assemble(
        "variable_tracking", tokenizer, target_tokens, rng, seed, data_dir,
        prefix="Memorize and track the chains of variable assignment hidden in the following "
        "text.\n\n",
        needles=needles,
        question=(
            f"\n\nQuestion: Find all variables that are assigned the value {value} in the text "
            f"above. Answer: According to the chains of variable assignment in the text above, "
            f"{num_hops + 1} variables are assigned the value {value}, they are:"
        ),
        answer=chains[0]["names"],
        extra={"depth": depth, "chains": chains},
    )


#: Task name -> generator; every generator takes ``(tokenizer, target_tokens, *,
#: depth=..., seed=..., data_dir=...)`` plus its own keyword arguments.
TASKS: dict[str, Callable[..., TaskSample]] = {
    "passkey": passkey_retrieval,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
}


def _magic_numbers(
    task: str,
    tokenizer: Tokenizer,
    target_tokens: int,
    depth: float,
    seed: int,
    data_dir: str | Path,
    *,
    num_keys: int,
    values_per_key: int,
    num_queries: int,
) -> TaskSample:
    """The NIAH family: ``num_keys`` keys with ``values_per_key`` numbers each.

    The first ``num_queries`` keys are asked for. The first needle (queried key,
    first value) sits at ``depth``; every other needle at a seeded random depth.
    """
    if min(num_keys, values_per_key, num_queries) < 1 or num_queries > num_keys:
        raise ValueError(
            f"bad needle counts: keys={num_keys} values={values_per_key} queries={num_queries}"
        )
    rng = random.Random(f"{task}:{seed}")
    keys = _distinct(num_keys, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
    values = _numbers(rng, num_keys * values_per_key)
    by_key = {key: values[i * values_per_key : (i + 1) * values_per_key]
              for i, key in enumerate(keys)}
    needles = [
        (depth if (i, j) == (0, 0) else rng.random(),
         f"One of the special magic numbers for {key} is: {value}.")
        for i, key in enumerate(keys)
        for j, value in enumerate(by_key[key])
    ]
    queried = keys[:num_queries]
    asked = _join_words(queried)
    if num_queries == 1 and values_per_key == 1:
        answer: str | list[str] = by_key[queried[0]][0]
        question = (
            f"\n\nWhat is the special magic number for {asked} mentioned in the provided text? "
            f"The special magic number for {asked} mentioned in the provided text is"
        )
    else:
        answer = [value for key in queried for value in by_key[key]]
        question = (
            f"\n\nWhat are all the special magic numbers for {asked} mentioned in the provided "
            f"text? The special magic numbers for {asked} mentioned in the provided text are"
        )
    return _assemble(
        task, tokenizer, target_tokens, rng, seed, data_dir,
        prefix=(
            "Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.\n\n"
        ),
        needles=needles,
        question=question,
        answer=answer,
        extra={"depth": depth, "keys": keys, "queried_keys": queried},
    )


def _assemble(
    task: str,
    tokenizer: Tokenizer,
    target_tokens: int,
    rng: random.Random,
    seed: int,
    data_dir: str | Path,
    *,
    prefix: str,
    needles: list[tuple[float, str]],
    question: str,
    answer: str | list[str],
    extra: dict[str, Any],
) -> TaskSample:
    """Fill the haystack to at most ``target_tokens`` prompt tokens and place the needles.

    A needle at depth ``d`` goes before filler sentence ``round(d * n)`` of ``n``, so
    ``0.0`` is the very start of the haystack and ``1.0`` its very end. The sentence
    count is the largest that keeps the whole prompt within budget (binary search
    over real tokenizations: BPE counts are not additive over sentences).
    """
    for needle_depth, _ in needles:
        if not 0.0 <= needle_depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {needle_depth}")
    source, stream = _filler_stream(Path(data_dir), rng)
    pool: list[str] = []

    def render(n: int) -> str:
        while len(pool) < n:
            pool.append(next(stream))
        parts = pool[:n]
        placed = sorted((round(d * n), order, text) for order, (d, text) in enumerate(needles))
        for index, _, text in reversed(placed):
            parts.insert(index, text)
        return prefix + " ".join(parts) + question

    def fits(n: int) -> bool:
        return count_tokens(tokenizer, render(n)) <= target_tokens

    if not fits(0):
        raise ValueError(
            f"{task}: instructions, needles and question alone exceed {target_tokens} tokens"
        )
    high = 16
    while fits(high):
        high *= 2
    low = high // 2 if high > 16 else 0
    while high - low > 1:  # invariant: fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    prompt = render(low)
    metadata = {
        "task": task,
        "seed": seed,
        "target_tokens": target_tokens,
        "num_tokens": count_tokens(tokenizer, prompt),
        "filler": source,
        "filler_sentences": low,
        "needles": needles,
        **extra,
    }
    return TaskSample(prompt=prompt, answer=answer, metadata=metadata)


def _filler_stream(data_dir: Path, rng: random.Random) -> tuple[str, Iterator[str]]:
    """Endless filler sentences: multi_news from a seeded start, else generated ones."""
    path = data_dir / MULTI_NEWS
    if path.is_file():
        sentences = _multi_news_sentences(path)
        if sentences:
            start = rng.randrange(len(sentences))
            return "multi_news", itertools.islice(itertools.cycle(sentences), start, None)
    return "generated", _generated_sentences(random.Random(rng.random()))


@functools.lru_cache(maxsize=4)
def _multi_news_sentences(path: Path) -> tuple[str, ...]:
    """Sentences of every ``context`` in the file, whitespace-normalised, in file order."""
    sentences: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            context = json.loads(line)["context"]
            text = re.sub(r"Passage \d+:", " ", context.replace("NEWLINE_CHAR", " "))
            text = " ".join(text.split())
            sentences.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
    return tuple(sentences)


def _generated_sentences(rng: random.Random) -> Iterator[str]:
    """Plain news-like sentences, for machines without the LongBench files."""
    while True:
        yield (
            f"{rng.choice(_FILLER_SUBJECTS).capitalize()} {rng.choice(_FILLER_VERBS)} "
            f"{rng.choice(_FILLER_OBJECTS)} {rng.choice(_FILLER_TAILS)}."
        )


def _numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    """``count`` distinct random numbers of exactly ``digits`` digits, as strings."""
    return _distinct(count, lambda: str(rng.randrange(10 ** (digits - 1), 10**digits)))


def _distinct(count: int, make: Callable[[], str]) -> list[str]:
    """``count`` distinct draws of ``make`` (distractors must never equal the answer)."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen[make()] = None
    return list(seen)


def _join_words(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
