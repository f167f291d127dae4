"""Which layers' observation windows find the answer: needle recall by layer.

FastKV's selection at a layer keeps what that layer's window queries attend to. After
token-selective propagation at layer ``l`` the later layers only see the tokens that
layer ``l``'s head-summed top-``P`` kept, so an answer that ``l`` misses is gone for
good; retention instead chooses again in every layer. Which layer makes a good TSP layer
is a property of the model (the method's rule of thumb is the middle of the stack).

This prefills each prompt of the harness's task grid once in the torch reference with
retention only: every layer then scores over the whole prompt, so layer ``l``'s scores
rank exactly what TSP at ``l`` would rank. Per layer it reports:

- ``tsp``: the fraction of the answer's token positions inside the top-``P`` set
  (``--tsp-rate``, head-summed scores plus the window), as if TSP ran at that layer;
- ``retain``: the same fraction for the per-KV-head top-``B`` sets (``--retain-rate``),
  averaged over KV heads.

The answer's positions are every place its tokens occur in the prompt (each value of a
list answer; variable tracking's names are skipped as they occur all over). One forward
pass a prompt and no decoding, so a grid that takes hours of greedy decoding per setting
takes minutes here.

    python -m benchmarks.accuracy.layer_recall --model-dir DIR \\
        --tasks niah_single niah_multikey passkey --lengths 2048 4096 --seeds 2

Grid flags (``--tasks``, ``--lengths``, ``--depths``, ``--seeds``, ``--data-dir``,
``--window``, ``--tsp-rate``) are the harness's; ``--out`` gets the per-prompt recalls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.accuracy import harness
from vllm_fastkv.config import FastKVConfig
from vllm_fastkv.reference import fastkv_prefill
from vllm_fastkv.reference.fastkv import PrefillResult
from vllm_fastkv.reference.scoring import select_propagated, token_budget


def answer_positions(ids: Sequence[int], answer: str | list[str], tokenizer: Any) -> list[int]:
    """Prompt positions of every occurrence of the answer's tokens (each listed value's).

    A value is looked for as encoded alone, else after a space (BPE tokenizers that merge
    a leading space into the first token, unlike Qwen2's one token a digit). Only values
    are searched for: the question names a key, not the value.
    """
    values = [answer] if isinstance(answer, str) else list(answer)
    found: set[int] = set()
    for value in values:
        for text in (value, " " + value):
            pattern = list(tokenizer.encode(text, add_special_tokens=False))
            n = len(pattern)
            starts = [s for s in range(len(ids) - n + 1) if list(ids[s:s + n]) == pattern]
            found.update(i for s in starts for i in range(s, s + n))
            if starts:
                break
    return sorted(found)


def layer_recalls(prefill: PrefillResult, positions: Sequence[int], *,
                  tsp_rate: float) -> list[dict[str, float]]:  # fmt: skip
    """Per layer: the share of ``positions`` in TSP's top-P set and in each head's top-B
    (mean over KV heads), from a retention-only prefill's scores and kept indices (the
    window is what the scores leave out)."""
    target = torch.tensor(positions)
    length = prefill.prompt_len
    recalls = []
    for layer in prefill.layers:
        if layer.scores is None or layer.positions.numel() != length:
            raise ValueError("layer_recalls needs a retention-only fastkv prefill")
        window = length - layer.scores.shape[-1]
        propagate = token_budget(length, mode="proportional", rate=tsp_rate,
                                 capacity=length, window=window)  # fmt: skip
        chosen = layer.positions[select_propagated(layer.scores, propagate, length)]
        per_head = [torch.isin(target, head).float().mean().item() for head in layer.indices]
        recalls.append({"tsp": torch.isin(target, chosen).float().mean().item(),
                        "retain": sum(per_head) / len(per_head)})  # fmt: skip
    return recalls


def main() -> None:
    p = harness.reference_parser(__doc__)
    p.add_argument("--retain-rate", type=float, default=0.1)
    args = p.parse_args()
    window = args.window or FastKVConfig.model_fields["window"].default

    tokenizer, model = harness.load_reference_model(args.model_dir)
    prompts, start = [], time.time()
    for sample in harness.build_prompts(tokenizer, args):
        if sample["task"] == "variable_tracking":
            continue
        key = {k: sample[k] for k in ("task", "context_len", "depth", "seed")}
        positions = answer_positions(sample["ids"], sample["answer"], tokenizer)
        if not positions:
            print(*key.values(), "answer not found as tokens: skipped", flush=True)
            continue
        prefill = fastkv_prefill(model, sample["ids"], policy="fastkv", tsp_rate=1.0,
                                 retain_rate=args.retain_rate, window=window)  # fmt: skip
        recalls = layer_recalls(prefill, positions, tsp_rate=args.tsp_rate)
        prompts.append(key | {"answer_tokens": len(positions), "recalls": recalls})
        print(*key.values(), " ".join(f"{r['tsp']:.2f}" for r in recalls),
              f"{time.time() - start:.0f} s", flush=True)  # fmt: skip

    layers = len(prompts[0]["recalls"])
    print(f"layer  tsp@{args.tsp_rate}  retain@{args.retain_rate}  (mean over "
          f"{len(prompts)} prompts, window {window})")  # fmt: skip
    means = []
    for index in range(layers):
        tsp = sum(p["recalls"][index]["tsp"] for p in prompts) / len(prompts)
        retain = sum(p["recalls"][index]["retain"] for p in prompts) / len(prompts)
        means.append({"layer": index, "tsp": tsp, "retain": retain})
        print(f"{index:5d}  {tsp:8.3f}  {retain:9.3f}")
    harness.write_reference_record(args, {"window": window, "tsp_rate": args.tsp_rate,
                                          "retain_rate": args.retain_rate, "means": means,
                                          "prompts": prompts})  # fmt: skip


if __name__ == "__main__":
    main()
