"""Selection settings compared in the torch reference, prompt by prompt.

Engines round each KV head's budget up to whole cache blocks (16 tokens on GPUs, 128 on
vLLM's CPU backend), so a CPU engine cannot stand in for a GPU grid at a small budget.
The torch reference (:func:`vllm_fastkv.reference.fastkv_prefill`, exact budgets) can:
this prefills each prompt of the harness's task grid once per configuration (keyword
arguments of ``fastkv_prefill``), decodes greedily and scores exact match.

    python -m benchmarks.accuracy.reference_settings --model-dir DIR \\
        --tasks niah_single niah_multikey --lengths 2048 --depths 0.3 0.5 0.7 --seeds 2 \\
        --configs '{"full": {"policy": "full"}, "w8": {"window": 8}, "w16": {"window": 16}}'

A configuration's keywords default to retention alone (``tsp_rate 1.0``) at
``retain_rate 0.1``. Grid flags (``--tasks``, ``--lengths``, ``--depths``, ``--seeds``,
``--max-tokens``, ``--data-dir``) are the harness's. Prints one line per prompt and the
mean per configuration; ``--out`` gets every prompt's scores.
"""

from __future__ import annotations

import json
import time

from benchmarks.accuracy import harness
from vllm_fastkv.reference import fastkv_prefill, greedy_decode, tasks

DEFAULTS = {"policy": "fastkv", "tsp_rate": 1.0, "retain_rate": 0.1}


def main() -> None:
    p = harness.reference_parser(__doc__)
    p.add_argument("--configs", required=True, type=json.loads,
                   help="JSON object: name -> fastkv_prefill keyword arguments")
    args = p.parse_args()

    tokenizer, model = harness.load_reference_model(args.model_dir)
    prompts = []
    start = time.time()
    for sample in harness.build_prompts(tokenizer, args):
        scores = {}
        for name, kwargs in args.configs.items():
            prefill = fastkv_prefill(model, sample["ids"], **(DEFAULTS | kwargs))
            tokens = greedy_decode(model, prefill, args.max_tokens, tokenizer.eos_token_id)
            reply = tokenizer.decode(tokens, skip_special_tokens=True)
            scores[name] = tasks.score_exact_match(reply, sample["answer"])
        key = {k: sample[k] for k in ("task", "context_len", "depth", "seed")}
        prompts.append(key | {"scores": scores})
        print(*key.values(), scores, f"{time.time() - start:.0f} s", flush=True)
    means = {name: sum(p["scores"][name] for p in prompts) / len(prompts)
             for name in args.configs}  # fmt: skip
    print(json.dumps(means))
    harness.write_reference_record(args, {"configs": args.configs, "means": means,
                                          "prompts": prompts})  # fmt: skip


if __name__ == "__main__":
    main()
