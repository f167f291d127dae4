"""Mixed-precision KV in the torch reference: what retention evicts kept at low bits.

Answers, before any engine support, whether storing the tokens KV retention would drop
at 2 or 4 bits (MiKV's idea; :func:`vllm_fastkv.reference.keep_evicted_low_bit`)
recovers the accuracy retention loses, on the accuracy harness's task grid. For each
prompt the reference (:mod:`vllm_fastkv.reference`, HF transformers model on CPU or GPU)
prefills once with the whole KV and once with retention alone, then decodes greedily on:

* ``full``: the whole KV at full precision;
* ``retention``: the retained entries only (``retain_rate`` of the prompt, exact budget,
  no block rounding);
* ``mixed``: the retained entries at full precision plus the evicted ones at ``--bits``;
* ``all_lowbit``: every entry at ``--bits`` (no retention): quantisation alone.

    python -m benchmarks.accuracy.mixed_precision --model-dir /tmp/smollm2 \\
        --bits 2 --rate 0.1 --lengths 2048 --depths 0.1 0.5 0.9 --seeds 1 --out mixed.json

Grid flags (``--tasks``, ``--lengths``, ``--depths``, ``--seeds``, ``--max-tokens``,
``--data-dir``) are the harness's. Prints one line per prompt and the mean exact match
per configuration; ``--out`` gets the per-task rows and the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict

from benchmarks.accuracy import harness
from vllm_fastkv.reference import (
    PrefillResult,
    fastkv_prefill,
    greedy_decode,
    keep_evicted_low_bit,
    tasks,
)
from vllm_fastkv.reference.lowbit import round_trip_layer

CONFIGS = ("full", "retention", "mixed", "all_lowbit")


def caches(full: PrefillResult, retained: PrefillResult, args: argparse.Namespace) -> dict:
    """The prefill each configuration decodes on."""
    store = dict(bits=args.bits, value_group=args.value_group, block_size=args.block_size)
    return {
        "full": full,
        "retention": retained,
        "mixed": keep_evicted_low_bit(full, retained, **store),
        "all_lowbit": dataclasses.replace(
            full, layers=[round_trip_layer(layer, **store) for layer in full.layers]
        ),
    }


def main() -> None:
    p = harness.reference_parser(__doc__)
    p.add_argument("--bits", type=int, choices=(2, 4), default=2)
    p.add_argument("--rate", type=float, default=0.1, help="retention's retain rate")
    p.add_argument("--value-group", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16, help="keys' quantisation group")
    args = p.parse_args()

    tokenizer, model = harness.load_reference_model(args.model_dir)
    samples = harness.build_prompts(tokenizer, args)
    scores: dict[str, dict[tuple, list[float]]] = {c: defaultdict(list) for c in CONFIGS}
    start = time.time()
    for sample in samples:
        full = fastkv_prefill(model, sample["ids"], policy="full")
        retained = fastkv_prefill(model, sample["ids"], policy="fastkv", tsp_rate=1.0,
                                  retain_rate=args.rate)  # fmt: skip
        key = (sample["task"], sample["context_len"], sample["depth"])
        line = {}
        for config, prefill in caches(full, retained, args).items():
            tokens = greedy_decode(model, prefill, args.max_tokens, tokenizer.eos_token_id)
            reply = tokenizer.decode(tokens, skip_special_tokens=True)
            line[config] = tasks.score_exact_match(reply, sample["answer"])
            scores[config][key].append(line[config])
        print(*key, line, f"{time.time() - start:.0f} s", flush=True)
    means = {c: sum(sum(v) / len(v) for v in rows.values()) / len(rows)
             for c, rows in scores.items()}  # fmt: skip
    print(json.dumps(means))
    rows = [
        {"config": c, "task": t, "context_len": n, "depth": d, "score": sum(v) / len(v)}
        for c, by_key in scores.items() for (t, n, d), v in sorted(by_key.items())
    ]  # fmt: skip
    settings = {k: getattr(args, k) for k in ("bits", "rate", "value_group", "block_size")}
    harness.write_reference_record(args, {"settings": settings, "means": means, "rows": rows})


if __name__ == "__main__":
    main()
