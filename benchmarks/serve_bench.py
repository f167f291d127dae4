"""Stock vLLM vs FASTKV on one GPU: TTFT, decode TPOT/throughput, KV blocks, concurrency.

Each backend runs in a fresh process (``--worker``) on the same model config with
``load_format="dummy"``; the driver runs them back to back, so both are measured in one
run on one machine, and writes one JSON record per measurement.

    python benchmarks/serve_bench.py --backends FLASH_ATTN FASTKV \
        --fastkv '{"retain_rate": 0.1, "tsp_rate": 0.2}' --out results.json
    # or any list of configurations, e.g. stock bf16 and fp8 KV against FASTKV at 2 bits:
    python benchmarks/serve_bench.py --runs '[{"backend": "FLASH_ATTN"},
        {"backend": "FLASH_ATTN", "kv_cache_dtype": "fp8"},
        {"backend": "FASTKV", "fastkv": {"retain_rate": 0.1, "kv_bits": 2}}]'

Method (wall clock around ``LLM.generate``, after a warm-up; fresh random token-id
prompts for every measurement, so prefix caching never hides prefill):
- TTFT: median over ``--reps`` of ``generate(prompt, max_tokens=1)`` at batch 1.
- decode: B prompts with ``max_tokens=1 + N`` are added to the engine, which is stepped
  until every request has its first token (``prefill_s``) and then until all are done;
  TPOT = decode time / N and output throughput = B * N / decode time, the decode time
  being the wall time of those later steps (each one token of every request; their
  trace is summarised as ``decode_step_ms``). Timing the decode steps themselves, not
  subtracting a ``max_tokens=1`` run from a ``1 + N`` run: at 16 x 32K each of those
  takes ~19 s, and their prefills' jitter (0.1-0.2 s) moved TPOT by 1-1.5 ms. A batch
  whose KV does not fit the pool runs in waves, as a server would run it
  (``fits_kv_pool`` says so).
- KV blocks: the scheduler's free-block count is read after every scheduling step;
  peak use = total - minimum free. max_concurrent = requests of (prompt + output)
  tokens that the KV pool holds, from the number of blocks the engine allocated.
- concurrency (``--concurrency-len``, measured, not computed): ``--concurrency-requests``
  prompts are submitted at once with a long ``max_tokens``; the engine is stepped until
  every request has been admitted and prefilled, or no new request has reached decode for
  ``--stall-steps`` steps (the pool is full); the record holds the peak number of
  requests decoding at the same time and the preemptions seen. Then all are aborted.
- profile (``--profile-lens``): one batch-1 prefill under the torch profiler, after every
  other measurement (the profiler slows the host): wall time, the GPU's busy time (union
  of kernel intervals, so wall minus busy is time the GPU waited on the host) and the
  kernels that took most of it, grouped by name.
- decode profile (``--profile-decode-lens``): the same for ``--profile-steps`` engine steps
  of a ``--profile-batch`` batch decoding, after its prefill and ``--profile-skip`` steps
  that are timed one by one (the per-step trace behind a TPOT).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH_RECORD "

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


#: A few-layer model of the same family, to check the harness itself on a CPU.
SMOKE = {
    **LLAMA_31_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "torch_dtype": "float32",
}
SHAPES = {"llama-3.1-8b": LLAMA_31_8B, "smoke": SMOKE}


def write_model_config(path: Path, shape: str) -> Path:
    """A model directory holding only config.json (weights are dummy)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[shape], indent=1))
    return path


# --------------------------------------------------------------------------- worker
class _BlockWatcher:
    """Records the scheduler's minimum free KV blocks (in-process engine only)."""

    def __init__(self, llm) -> None:
        core = llm.llm_engine.engine_core.engine_core
        self.pool = core.scheduler.kv_cache_manager.block_pool
        self.total = self.pool.num_gpu_blocks
        self.min_free = self.pool.get_num_free_blocks()
        schedule = core.scheduler.schedule

        def watched_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.min_free = min(self.min_free, self.pool.get_num_free_blocks())
            return out

        core.scheduler.schedule = watched_schedule

    def reset(self) -> None:
        self.min_free = self.pool.get_num_free_blocks()

    @property
    def peak_used(self) -> int:
        return self.total - self.min_free


def _prompts(rng, batch: int, length: int, vocab: int) -> list:
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(prompt_token_ids=rng.integers(1000, vocab - 1000, length).tolist())
        for _ in range(batch)
    ]


def _timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed


def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    from vllm import LLM
    from vllm.platforms import current_platform

    shape = SHAPES[args.shape]
    engine = dict(
        model=str(write_model_config(Path(args.model_dir) / args.shape, args.shape)),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=shape["torch_dtype"],
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.backend,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=0,
    )
    if args.backend == "FASTKV":
        engine["additional_config"] = {"fastkv": json.loads(args.fastkv)}
    t0 = time.perf_counter()
    llm = LLM(**engine)
    startup_s = time.perf_counter() - t0
    watcher = _BlockWatcher(llm)
    cache = llm.llm_engine.vllm_config.cache_config
    block_size = cache.block_size
    vocab = shape["vocab_size"]
    rng = np.random.default_rng(1234)

    base = {
        "date": datetime.date.today().isoformat(),
        "device": current_platform.get_device_name(),
        "git_commit": args.git_commit,
        "backend": args.backend,
        "kv_cache_dtype": args.kv_cache_dtype,
        "fastkv": json.loads(args.fastkv) if args.backend == "FASTKV" else None,
        "model": f"{args.shape}-shape-dummy",
        "kv_cache_blocks": watcher.total,
        "block_size": block_size,
        "engine_startup_s": round(startup_s, 1),
    }

    def emit(**record) -> None:
        print(RESULT_PREFIX + json.dumps({**base, **record}), flush=True)

    # Warm-up: compile paths for prefill and decode shapes, and a prompt long enough to
    # be prefilled in chunks (FASTKV's chunked-prefill path has kernels of its own).
    # It decodes as many tokens as the decode runs do, so every decode-time path (packed
    # pages attended, pages packed while decoding) has run once before anything is timed.
    _timed(llm, _prompts(rng, 2, min(2048, args.max_model_len // 2), vocab), 8)
    long_len = max(1, min(32768, args.max_model_len - 1 - args.decode_tokens))
    _timed(llm, _prompts(rng, 1, long_len, vocab), args.decode_tokens)

    for prompt_len in args.ttft_lens:
        if prompt_len + 1 > args.max_model_len:
            continue
        times = []
        watcher.reset()
        for _ in range(args.reps):
            times.append(_timed(llm, _prompts(rng, 1, prompt_len, vocab), 1))
        emit(
            kind="ttft",
            prompt_len=prompt_len,
            batch=1,
            ttft_ms=round(1000 * statistics.median(times), 2),
            ttft_all_ms=[round(1000 * t, 2) for t in times],
            peak_kv_blocks=watcher.peak_used,
        )

    n = args.decode_tokens
    for prompt_len in args.decode_lens:
        per_request_blocks = -(-(prompt_len + 1 + n) // block_size)
        # After prefill a compressed request holds fewer blocks; admission still needs
        # the whole prompt's blocks while it prefills, so the pool check stays on those.
        held_blocks = per_request_blocks - _freed_blocks(llm, args, prompt_len, block_size)
        for batch in args.batches:
            watcher.reset()
            t_prefill, t_full, steps_ms = measure_decode(
                llm, _prompts(rng, batch, prompt_len, vocab), n
            )
            decode_s = max(t_full - t_prefill, 1e-9)
            emit(
                kind="decode",
                prompt_len=prompt_len,
                batch=batch,
                output_tokens=n,
                tpot_ms=round(1000 * decode_s / n, 3),
                output_tok_s=round(batch * n / decode_s, 1),
                decode_step_ms={"steps": len(steps_ms),
                                "median": round(statistics.median(steps_ms), 3),
                                "max": max(steps_ms)},  # fmt: skip
                prefill_s=round(t_prefill, 3),
                prefill_tok_s=round(batch * prompt_len / t_prefill, 1),
                total_s=round(t_full, 3),
                peak_kv_blocks=watcher.peak_used,
                max_concurrent=watcher.total // held_blocks,
                # Otherwise the engine runs the batch in waves (the rest waits for blocks).
                fits_kv_pool=batch * held_blocks <= watcher.total,
            )

    for prompt_len in args.profile_lens:
        if prompt_len + 1 <= args.max_model_len:
            emit(kind="profile", prompt_len=prompt_len, batch=1,
                 **profile_prefill(llm, _prompts(rng, 1, prompt_len, vocab)))

    for prompt_len in args.profile_decode_lens:
        if prompt_len + 1 <= args.max_model_len:
            emit(kind="profile_decode", prompt_len=prompt_len, batch=args.profile_batch,
                 **profile_decode(llm, _prompts(rng, args.profile_batch, prompt_len, vocab),
                                  args.profile_steps, args.profile_skip))

    for prompt_len in args.concurrency_len:
        watcher.reset()
        prompts = _prompts(rng, args.concurrency_requests, prompt_len, vocab)
        result = measure_concurrency(llm, prompts, args.concurrency_max_tokens, args.stall_steps)
        emit(kind="concurrency", prompt_len=prompt_len, batch=args.concurrency_requests,
             peak_kv_blocks=watcher.peak_used, **result)


def measure_decode(llm, prompts, tokens: int) -> tuple[float, float, list[float]]:
    """Seconds until every request has its first token and until all have ``1 + tokens``
    (both from when they were added), and the wall time of each step in between (ms).

    The engine is stepped directly (as ``LLM.generate`` does), so the decode is the span
    between those two moments, not the difference of two separate runs."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=1 + tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = _prefill(engine, prompts, params, f"decode-{time.perf_counter_ns()}", [])
    prefilled = time.perf_counter()
    steps_ms: list[float] = []
    finished: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in _timed_step(engine, steps_ms):
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
    done = time.perf_counter()
    if finished != dict.fromkeys(ids, 1 + tokens):
        raise RuntimeError(f"decode run ended with {finished} tokens, not {1 + tokens} each")
    return prefilled - start, done - start, steps_ms


def profile_prefill(llm, prompts, top: int = 25) -> dict:
    """Wall time, GPU busy time and the costliest kernels of one ``generate`` call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        _timed(llm, prompts, 1)
        wall_s = time.perf_counter() - start
    return _kernel_summary(prof, wall_s, top)


def profile_decode(llm, prompts, steps: int, skip: int, top: int = 25) -> dict:
    """The same summary for ``steps`` engine steps of a batch decoding, its prefill and
    ``skip`` further steps done before the profiler starts (so only decode kernels are
    ranked, from the decode position that ``skip`` picks).

    The steps before the profiler are timed one by one (``prefill_step_ms``,
    ``skip_step_ms``), without the profiler: the trace of a whole decode that a TPOT
    averages away (a slow step every page, a one-time cost, the prefill's tail).
    """
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=skip + steps + 64, ignore_eos=True)
    prefill_ms: list[float] = []
    ids = _prefill(engine, prompts, params, "profile-decode", prefill_ms)
    skip_ms: list[float] = []
    for _ in range(skip):
        _timed_step(engine, skip_ms)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_s = time.perf_counter() - start
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"steps": steps, "skipped_steps": skip, "prefill_step_ms": prefill_ms,
            "skip_step_ms": skip_ms, **_kernel_summary(prof, wall_s, top)}


def _prefill(engine, prompts, params, tag: str, times_ms: list[float]) -> list[str]:
    """Add ``prompts`` as requests ``{tag}-{i}`` and step the engine until every one has
    its first token (prefill over), each step's wall time appended to ``times_ms``;
    returns the request ids."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    started: set[str] = set()
    while len(started) < len(ids):
        outputs = _timed_step(engine, times_ms)
        started.update(o.request_id for o in outputs if o.outputs[0].token_ids)
    return ids


def _timed_step(engine, times_ms: list[float]) -> list:
    """One engine step; its wall time in ms appended to ``times_ms``."""
    start = time.perf_counter()
    outputs = engine.step()
    times_ms.append(round(1000 * (time.perf_counter() - start), 2))
    return outputs


def _kernel_summary(prof, wall_s: float, top: int) -> dict:
    """Wall time, GPU busy time (overlaps counted once) and the ``top`` kernels by time."""
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us, end_us = 0.0, float("-inf")
    for begin, end in spans:  # union of intervals: overlapping kernels count once
        busy_us += max(0.0, end - max(begin, end_us))
        end_us = max(end_us, end)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    return {
        "wall_ms": round(1000 * wall_s, 2),
        "gpu_busy_ms": round(busy_us / 1000, 2),
        "gpu_span_ms": round((spans[-1][1] - spans[0][0]) / 1000, 2) if spans else 0.0,
        "kernels": [
            {"name": name[:120], "ms": round(sum(times) / 1000, 3), "count": len(times)}
            for name, times in ranked[:top]
        ],
    }


def _freed_blocks(llm, args: argparse.Namespace, prompt_len: int, block_size: int) -> int:
    """Blocks KV retention (and low-bit packing) returns per request after prefill, by the
    engine's own plan (0 for other backends)."""
    if args.backend != "FASTKV":
        return 0
    from vllm_fastkv.config import FastKVConfig
    from vllm_fastkv.retention import plan_retention

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    page_tokens = getattr(scheduler, "fastkv_page_tokens", 0)
    settings = FastKVConfig.validated(json.loads(args.fastkv))
    plan = plan_retention(settings, prompt_len, block_size, page_tokens)
    if plan is None:
        return 0
    per_page = getattr(scheduler, "fastkv_blocks_per_page", 1)
    return plan.start // block_size + plan.packed_pages * (per_page - 1)


def measure_concurrency(llm, prompts, max_tokens: int, stall_steps: int) -> dict:
    """Peak number of requests decoding at once (see the module docstring)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    preemptions = {"n": 0}
    preempt = scheduler._preempt_request

    def counting(request, timestamp):
        preemptions["n"] += 1
        return preempt(request, timestamp)

    scheduler._preempt_request = counting
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"concurrency-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    peak, since_peak, steps = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running)
        if decoding > peak:
            peak, since_peak = decoding, 0
        else:
            since_peak += 1
        all_in = not scheduler.waiting and decoding == len(scheduler.running) > 0
        if all_in or (peak > 0 and since_peak >= stall_steps):
            break
    elapsed = time.perf_counter() - start
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    scheduler._preempt_request = preempt
    return {
        "requests": len(prompts),
        "peak_decoding": peak,
        "preemptions": preemptions["n"],
        "steps": steps,
        "seconds": round(elapsed, 1),
        "all_admitted": peak == len(prompts),
    }


# --------------------------------------------------------------------------- driver
def _runs(args: argparse.Namespace) -> list[dict]:
    """The configurations to measure: ``--runs``, or one per ``--backends`` entry."""
    if args.runs:
        return json.loads(args.runs)
    return [{"backend": backend} for backend in args.backends]


def run_driver(args: argparse.Namespace) -> None:
    records = []
    out = Path(args.out)
    for run in _runs(args):
        backend = run["backend"]
        cmd = [sys.executable, __file__, "--worker", "--backend", backend,
               "--fastkv", json.dumps(run.get("fastkv", json.loads(args.fastkv))),
               "--kv-cache-dtype", run.get("kv_cache_dtype", args.kv_cache_dtype)]  # fmt: skip
        for key in (
            "shape",
            "model_dir",
            "max_model_len",
            "gpu_memory_utilization",
            "reps",
            "decode_tokens",
            "git_commit",
            "concurrency_requests",
            "concurrency_max_tokens",
            "stall_steps",
            "profile_batch",
            "profile_steps",
            "profile_skip",
        ):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        lists = ("ttft_lens", "decode_lens", "batches", "concurrency_len", "profile_lens",
                 "profile_decode_lens")
        for key in lists:
            # Forwarded even when empty: a bare flag turns a measurement off in the child too.
            cmd += [f"--{key.replace('_', '-')}", *map(str, getattr(args, key))]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        print(f"== {_label(run)}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                record = json.loads(line[len(RESULT_PREFIX) :])
                records.append(record)
                out.write_text(json.dumps(records, indent=1))
                print(json.dumps(record), flush=True)
            elif args.verbose or "Error" in line or "error" in line:
                print(line, end="", flush=True)
        if proc.wait() != 0:
            print(f"== {_label(run)} worker exited with {proc.returncode}", flush=True)
    _print_table(records)


def _label(record: dict) -> str:
    """Backend, plus the KV cache dtype and FastKV bits where they are not the default."""
    label = record["backend"]
    if record.get("kv_cache_dtype", "auto") != "auto":
        label += f"/{record['kv_cache_dtype']}"
    bits = (record.get("fastkv") or {}).get("kv_bits", 16)
    return label + (f"/{bits}bit" if bits < 16 else "")


def _print_table(records: list[dict]) -> None:
    print(
        f"{'run':<17} {'kind':<6} {'prompt':>7} {'batch':>5} {'ttft_ms':>9} "
        f"{'tpot_ms':>8} {'tok/s':>8} {'peak_blk':>8} {'max_conc':>8} {'decoding':>8}"
    )
    for r in records:
        print(
            f"{_label(r):<17} {r['kind']:<6} {r['prompt_len']:>7} {r['batch']:>5} "
            f"{r.get('ttft_ms', ''):>9} {r.get('tpot_ms', r.get('skipped', '')):>8} "
            f"{r.get('output_tok_s', ''):>8} {r.get('peak_kv_blocks', ''):>8} "
            f"{r.get('max_concurrent', ''):>8} {r.get('peak_decoding', ''):>8}"
        )
    for r in records:
        if r["kind"] == "profile_decode" and r["skip_step_ms"]:
            trace = r["skip_step_ms"]
            median = statistics.median(trace)
            slow = [i for i, ms in enumerate(trace) if ms > 2 * median]
            print(f"decode steps {_label(r)} {r['prompt_len']} x {r['batch']}: prefill "
                  f"{sum(r['prefill_step_ms']):.0f} ms in {len(r['prefill_step_ms'])} steps; "
                  f"{len(trace)} decode steps median {median} ms, max {max(trace)} ms, "
                  f"slower than 2x median at steps {slow[:20]}")
        if r["kind"] in ("profile", "profile_decode"):
            print(f"profile {_label(r)} {r['prompt_len']}: wall {r['wall_ms']} ms, "
                  f"GPU busy {r['gpu_busy_ms']} ms of a {r['gpu_span_ms']} ms span")
            for k in r["kernels"][:15]:
                print(f"  {k['ms']:>10.3f} ms {k['count']:>6}x  {k['name'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="FASTKV")
    parser.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "FASTKV"])
    parser.add_argument(
        "--runs",
        help="JSON list of configurations ({backend, fastkv?, kv_cache_dtype?}); overrides "
        "--backends",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", default="/tmp/fastkv-bench-models")
    parser.add_argument("--max-model-len", type=int, default=131072)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--ttft-lens", type=int, nargs="*", default=[8192, 32768, 131000])
    parser.add_argument("--decode-lens", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16, 32])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency-len", type=int, nargs="*", default=[])
    parser.add_argument("--profile-lens", type=int, nargs="*", default=[])
    parser.add_argument(
        "--profile-decode-lens",
        type=int,
        nargs="*",
        default=[],
        help="prompt lengths whose decode steps are profiled (kernels ranked by GPU time)",
    )
    parser.add_argument("--profile-batch", type=int, default=16)
    parser.add_argument("--profile-steps", type=int, default=32)
    parser.add_argument("--profile-skip", type=int, default=0,
                        help="decode steps run before the decode profile starts")
    parser.add_argument("--concurrency-requests", type=int, default=128)
    parser.add_argument("--concurrency-max-tokens", type=int, default=4096)
    parser.add_argument("--stall-steps", type=int, default=200)
    parser.add_argument(
        "--fastkv",
        default='{"tsp_rate": 1.0, "retain_rate": 0.1}',
        help="FastKV settings (JSON) for the FASTKV backend",
    )
    parser.add_argument("--git-commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
