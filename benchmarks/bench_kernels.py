"""FastKV kernels on one GPU at Llama-3.1-8B head shapes: time vs HBM floor, and correctness.

    python benchmarks/bench_kernels.py --out kernels.json
    python benchmarks/bench_kernels.py --out kernels.json --sweep   # + fused launch shapes

Needs torch and triton only (imports nothing but :mod:`vllm_fastkv.kernels`). For each
prompt length ``T`` (one sequence, bf16 paged cache, shuffled blocks):

* bandwidth: a large device-to-device ``copy_`` (bytes read + written / time), measured
  here so floors and kernels see the same machine state;
* ``window_scores`` (avg and max pooling) vs its floor: the key bytes read once / bandwidth,
  for the fused kernel (its second key pass should hit L2), the fused kernel with
  pass 2 deferred until pass 1 is done (``fused_no_reuse``: the L2 reuse lost), the
  two-pass kernels (``fused=None``, both passes from HBM, so 2x the floor is their limit)
  and, as the engine runs it on GPUs, the two-pass kernels' second pass alone with the
  window rows' log-sum-exps given (``attention_lse``: in the engine they come from the
  prompt's FlashAttention; here from :func:`window_lse_ref`, untimed), with
  ``max_seq_len`` from the host as the serving path calls it (no device sync);
* the mass kernel's key reads alone (``_key_gather_kernel``: its grid, tiles and loads,
  none of its work) vs the same floor: how much of ``attention_lse`` is reading the keys
  through the block table at that launch shape;
* ``select_retained`` (budget ``retain_rate * T``), ``select_propagated`` (``tsp_rate * T``)
  and a bare ``torch.topk`` of the same size, next to the scoring time (lengths and budgets
  as host lists, as the serving path passes them: no device sync);
* ``compact_kv`` to ``retain_rate`` vs its floor: the retained K and V bytes read and
  written once / bandwidth, front (``starts=None``) and tail-aligned (``starts = T - c``,
  the budget rounded up to whole blocks);
* correctness against the ``*_ref`` oracles at full size (relative score error, exact
  selection agreement, byte-exact compaction);
* with ``--sweep``: device time of the fused kernel (avg pooling) for a grid of
  :class:`~vllm_fastkv.kernels.scoring.FusedTuning` launch shapes, best first, each
  checked against the default shape's scores;
* with ``--tune [mass programs compact]`` (all when none is named): times of the
  ``attention_lse`` path (avg pooling) over a grid of the mass kernel's launch constants
  (``scoring._MASS_*``), over its programs per SM beyond that grid's, and of both
  compactions over ``compaction._BLOCK_R`` x
  ``_NUM_WARPS`` (restored afterwards), fastest span first.

Three times per op: ``call`` is the median of ``triton.testing.do_bench`` (L2 flushed between
calls; host work and device syncs included, which is what the engine pays), ``device`` the
GPU's busy time per call from the torch profiler (the sum of its kernels' durations:
kernel efficiency alone). Scoring also gets ``span``: the call captured in a CUDA graph
and replayed, the median time from its first kernel's start to its last kernel's end, so
the gaps between its launches count (host time does not), and launches that overlap
(programmatic dependent launch) count once. Prints a table, a two-pass vs fused summary,
and writes every number to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from vllm_fastkv.kernels import (
    compact_kv,
    compact_kv_ref,
    select_propagated,
    select_propagated_ref,
    select_retained,
    select_retained_ref,
    window_lse_ref,
    window_scores,
    window_scores_ref,
)
from vllm_fastkv.kernels import compaction as compaction_module
from vllm_fastkv.kernels import scoring as scoring_module
from vllm_fastkv.kernels.scoring import FusedTuning

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
# window_scores implementations: the fused kernel (default launch shape), the same with a
# lag beyond every item (pass 2 only after all of pass 1, so at these lengths its keys
# come from HBM again: what the L2 reuse is worth), and the two-pass kernels.
SCORING_PATHS: dict[str, FusedTuning | None] = {
    "fused": FusedTuning(),
    "fused_no_reuse": FusedTuning(lag_per_program=1e4),
    "two_pass": None,
}
# --tune grids: module constants of the mass kernel (scoring with the log-sum-exps given)
# and of compaction.
MASS_TUNING = dict(
    _MASS_BLOCK_N=(64, 128),
    _MASS_PROGRAMS_PER_SM=(2, 4, 8),
    _MASS_NUM_STAGES=(2, 3, 4),
    _MASS_NUM_WARPS=(4, 8),
)
# The mass kernel's programs per SM past --tune mass's 8 (at 32K tokens a program walks
# about 4 key tiles at 8 an SM, 1 at 32). On an H200 none beat 8 (docs/BENCHMARKS.md,
# "the pooling launch's width and the mass kernel's programs per SM").
PROGRAMS_TUNING = dict(_MASS_PROGRAMS_PER_SM=(8, 10, 12, 16, 24, 32))
COMPACT_TUNING = dict(_BLOCK_R=(16, 32, 64, 128, 256), _NUM_WARPS=(2, 4, 8))
TUNING_GRIDS = ("mass", "programs", "compact")
# --sweep grid of fused launch shapes.
SWEEP = dict(
    programs_per_sm=(1, 2, 4),
    tiles_per_item=(1, 2, 4, 8),
    lag_per_program=(0.25, 0.5, 1.0),
    num_warps=(4, 8),
)


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call as the caller sees it (host work and syncs included)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def device_ms(fn: Callable[[], object], iters: int = 20) -> tuple[float, dict[str, float]]:
    """Milliseconds per call the GPU spends in kernels and copies (no host overhead; L2
    stays warm between calls, unlike in :func:`bench_ms`), in total and per kernel name
    (which launch of a multi-launch op costs what)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = {
        e.key: e.self_device_time_total / iters / 1e3
        for e in prof.key_averages()
        if e.self_device_time_total > 0
    }
    return sum(per_kernel.values()), per_kernel


def graph_span_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Median milliseconds from a call's first kernel start to its last kernel end, the
    call captured once in a CUDA graph and replayed (so the host never delays a launch)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    # Every replay runs the same device activities, so in start order they fall into
    # ``iters`` equal groups, one a call.
    spans = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA
    )
    per_call, rest = divmod(len(spans), iters)
    if per_call == 0 or rest:
        raise RuntimeError(f"{len(spans)} device activities for {iters} calls")
    calls = (spans[i * per_call : (i + 1) * per_call] for i in range(iters))
    return statistics.median(max(e for _, e in c) - c[0][0] for c in calls) / 1e6


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


@triton.jit
def _key_gather_kernel(
    key_cache_ptr, block_table_ptr, out_ptr,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_bt,
    num_tokens, tiles_per_split,
    PAGE_SIZE: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """The mass kernel's key reads without its work: the same grid, tiles, pipelined loop
    and tile load (``scoring._key_tile_logits``, here against a query block of ones), the
    logits summed, one float per program out. What reading the keys through the block
    table costs at the mass kernel's launch shape."""
    h = tl.program_id(1)
    split = tl.program_id(2)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(num_tokens, BLOCK_N))
    offs_d = tl.arange(0, D)
    ones = tl.full([M, D], 1.0, key_cache_ptr.dtype.element_ty)
    acc = tl.zeros([M, BLOCK_N], tl.float32)
    for tile in tl.range(first, last, num_stages=NUM_STAGES):
        tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc += scoring_module._key_tile_logits(
            ones, key_cache_ptr, block_table_ptr, h, tok, tok < num_tokens,
            stride_kb, stride_ks, stride_kh, stride_kd, offs_d, offs_d < D, 1.0,
            PAGE_SIZE, "tf32",
        )  # fmt: skip
    tl.store(out_ptr + h * tl.num_programs(2) + split, tl.sum(tl.sum(acc, axis=1), axis=0))


def key_gather(key_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Launch :func:`_key_gather_kernel` over one sequence's first ``seq_len`` keys with
    the mass kernel's constants; per-program sums of the keys' channel sums (times 32)."""
    num_kv_heads, head_dim = key_cache.shape[2:]
    splits, tiles_per_split = scoring_module._key_splits(
        triton.cdiv(seq_len, scoring_module._MASS_BLOCK_N), num_kv_heads,
        scoring_module._MASS_PROGRAMS_PER_SM, key_cache.device,
        scoring_module._MASS_MAX_TILES_PER_SPLIT,
    )  # fmt: skip
    out = torch.empty(num_kv_heads, splits, dtype=torch.float32, device=key_cache.device)
    _key_gather_kernel[(1, num_kv_heads, splits)](
        key_cache, block_table, out, *key_cache.stride(), block_table.stride(0),
        seq_len, tiles_per_split, PAGE_SIZE=key_cache.shape[1], M=32, D=head_dim,
        BLOCK_N=scoring_module._MASS_BLOCK_N, NUM_STAGES=scoring_module._MASS_NUM_STAGES,
        num_warps=scoring_module._MASS_NUM_WARPS,
    )  # fmt: skip
    return out


def paged_cache(args: argparse.Namespace, seq_len: int, seed: int):
    """One sequence's bf16 (or ``--cache-dtype``) K/V in shuffled blocks, as vLLM lays out
    its cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` split into views."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = -(-seq_len // args.block_size) + 16
    kv = torch.randn(
        num_blocks,
        args.num_kv_heads,
        args.block_size,
        2 * args.head_dim,
        device="cuda",
        generator=gen,
    )
    kv = kv.to(DTYPES[args.cache_dtype])
    key_cache, value_cache = kv.transpose(1, 2).split(args.head_dim, dim=-1)
    blocks = torch.randperm(num_blocks, device="cuda", generator=gen)[: num_blocks - 16]
    block_table = blocks.to(torch.int32)[None]
    query = torch.randn(
        1, args.window, args.num_q_heads, args.head_dim, device="cuda", generator=gen
    )
    return kv, key_cache, value_cache, block_table, query.to(torch.bfloat16)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over finite entries; inf if the -inf padding differs."""
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite):
        return math.inf
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm())


def scoring_op(pooling: str, path: str) -> str:
    """Table name of a scoring row: the default (two-pass) kernels go by the plain name."""
    return f"window_scores[{pooling}]" if path == "two_pass" else f"window_scores[{pooling},{path}]"


def sweep_fused(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    score_kwargs: dict,
    expected: torch.Tensor,
    sweep: list[dict],
) -> None:
    """Device time of the fused kernel (avg pooling) for every launch shape of ``SWEEP``;
    each shape's scores are checked against ``expected`` (the default shape's)."""
    seq_len = score_kwargs["max_seq_len"]
    for values in itertools.product(*SWEEP.values()):
        tuning = FusedTuning(**dict(zip(SWEEP, values)))

        def scoring(tuning: FusedTuning = tuning) -> torch.Tensor:
            return window_scores(query, key_cache, block_table, seq_lens, fused=tuning,
                                 **score_kwargs)  # fmt: skip

        sweep.append(
            dict(
                seq_len=seq_len,
                **dict(zip(SWEEP, values)),
                device_ms=device_ms(scoring)[0],
                rel_error_vs_default=rel_error(scoring(), expected),
            )
        )


def tune_constants(
    tuning: list[dict],
    op: str,
    seq_len: int,
    module: object,
    grid: dict[str, tuple],
    fn: Callable[[], object],
    floor_ms: float,
) -> None:
    """Device time of ``fn`` with the module's launch constants set to every combination
    of ``grid`` (restored afterwards): the evidence behind the defaults."""
    defaults = {name: getattr(module, name) for name in grid}
    try:
        for values in itertools.product(*grid.values()):
            for name, value in zip(grid, values):
                setattr(module, name, value)
            ms, span = device_ms(fn)[0], graph_span_ms(fn)
            tuning.append(dict(op=op, seq_len=seq_len, **dict(zip(grid, values)),
                               device_ms=ms, device_x_floor=ms / floor_ms,
                               span_ms=span, span_x_floor=span / floor_ms))  # fmt: skip
    finally:
        for name, value in defaults.items():
            setattr(module, name, value)


def print_tuning(tuning: list[dict]) -> None:
    """The five fastest launch-constant combinations per op, length and grid, by span (a
    dependent launch's duration includes its wait, so the sum of durations misranks)."""
    def grid_of(entry: dict) -> tuple:
        return tuple(k for k in entry if k.startswith("_"))

    for key in sorted({(e["op"], e["seq_len"], grid_of(e)) for e in tuning}):
        entries = sorted((e for e in tuning if (e["op"], e["seq_len"], grid_of(e)) == key),
                         key=lambda e: e["span_ms"])  # fmt: skip
        print(f"{key[0]} at T={key[1]}, fastest {', '.join(key[2])} first:")
        for entry in entries[:5]:
            names = ", ".join(f"{k}={v}" for k, v in entry.items() if k.startswith("_"))
            print(f"  span {entry['span_ms']:.4f} ms ({entry['span_x_floor']:.2f}x), "
                  f"durations {entry['device_ms']:.4f} ms  {names}")


def print_scoring_summary(rows: list[dict], sweep: list[dict]) -> None:
    """Two-pass vs fused device time per length and pooling, and the sweep's best shapes."""
    by_key = {(row["op"], row["seq_len"]): row for row in rows}
    print("window_scores span ms (x the read-once floor): two-pass, fused, fused without"
          " L2 reuse, one pass given the log-sum-exps:")  # fmt: skip
    for seq_len in sorted({row["seq_len"] for row in rows}):
        for pooling in ("avg", "max"):
            cells = (
                by_key[(scoring_op(pooling, path), seq_len)]
                for path in ("two_pass", "fused", "fused_no_reuse", "attention_lse")
            )
            print(
                f"  T={seq_len:>7} {pooling}: "
                + ", ".join(f"{c['span_ms']:.4f} ({c['span_x_floor']:.2f}x)" for c in cells)
                + f"; floor {by_key[(scoring_op(pooling, 'two_pass'), seq_len)]['floor_ms']:.3f} ms"
            )
    for seq_len in sorted({entry["seq_len"] for entry in sweep}):
        entries = sorted(
            (e for e in sweep if e["seq_len"] == seq_len), key=lambda e: e["device_ms"]
        )
        print(f"fused launch shapes at T={seq_len}, fastest first (avg pooling):")
        for entry in entries[:8]:
            shape = ", ".join(f"{name}={entry[name]}" for name in SWEEP)
            print(
                f"  {entry['device_ms']:.4f} ms  {shape}"
                f"  (rel. error vs default {entry['rel_error_vs_default']:.1e})"
            )


def measure(
    rows: list[dict],
    op: str,
    seq_len: int,
    fn: Callable[[], object],
    floor_ms: float | None,
    span: bool = False,
) -> None:
    """Append one table row: call time, device time, with ``span`` the graph-replayed
    span (:func:`graph_span_ms`) and, if given, the HBM floor."""
    total_ms, per_kernel_ms = device_ms(fn)
    row = {
        "op": op,
        "seq_len": seq_len,
        "call_ms": bench_ms(fn),
        "device_ms": total_ms,
        "span_ms": None,
        "kernels_ms": per_kernel_ms,
        "floor_ms": floor_ms,
    }
    if span:
        try:
            row["span_ms"] = graph_span_ms(fn)
        except RuntimeError as error:  # an op that cannot be captured, or a profile gap
            print(f"{op} at T={seq_len}: no span ({error})")
    if floor_ms:
        row["call_x_floor"] = row["call_ms"] / floor_ms
        row["device_x_floor"] = row["device_ms"] / floor_ms
        if row["span_ms"]:
            row["span_x_floor"] = row["span_ms"] / floor_ms
    rows.append(row)


def run_length(
    args: argparse.Namespace,
    seq_len: int,
    bandwidth: float,
    rows: list[dict],
    sweep: list[dict],
    tuning: list[dict],
) -> dict:
    """Every measurement at prompt length ``seq_len``; returns the correctness checks."""
    kv, key_cache, value_cache, block_table, query = paged_cache(args, seq_len, seed=seq_len)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    elem = key_cache.element_size()
    key_floor_ms = seq_len * args.num_kv_heads * args.head_dim * elem / bandwidth * 1e3
    checks: dict = {"seq_len": seq_len}

    ref_kwargs = dict(scale=args.head_dim**-0.5, window=args.window, pool_kernel=7)
    score_kwargs = ref_kwargs | dict(max_seq_len=seq_len)
    lse = window_lse_ref(query, key_cache, block_table, seq_lens, scale=ref_kwargs["scale"],
                         window=args.window)  # fmt: skip
    paths = {path: dict(fused=tuning) for path, tuning in SCORING_PATHS.items()}
    paths["attention_lse"] = dict(lse=lse)
    for pooling in ("avg", "max"):
        ref = None
        if args.check:
            ref = window_scores_ref(
                query, key_cache, block_table, seq_lens, pooling=pooling, **ref_kwargs
            )
        for path, path_kwargs in paths.items():

            def scoring(pooling: str = pooling, path_kwargs: dict = path_kwargs) -> torch.Tensor:
                return window_scores(
                    query, key_cache, block_table, seq_lens, pooling=pooling,
                    **path_kwargs, **score_kwargs,
                )  # fmt: skip

            measure(rows, scoring_op(pooling, path), seq_len, scoring, key_floor_ms, span=True)
            if ref is not None:
                checks[f"scores_{pooling}_{path}_rel_error"] = rel_error(scoring(), ref)
        del ref
    # What the mass kernel's reads alone cost (its grid, tiles and loads, none of its work).
    scored = seq_len - args.window
    measure(rows, "key reads (mass kernel's shape)", seq_len,
            lambda: key_gather(key_cache, block_table, scored), key_floor_ms,
            span=True)  # fmt: skip
    if args.check:
        sums = key_gather(key_cache, block_table, scored).sum(dim=1).double()
        tokens = torch.arange(scored, device="cuda")
        keys = key_cache[block_table[0, tokens // args.block_size], tokens % args.block_size]
        expected = 32 * keys.double().sum(dim=(0, 2))
        checks["key_reads_rel_error"] = float((sums - expected).norm() / expected.norm())
    for grid_name, grid in (("mass", MASS_TUNING), ("programs", PROGRAMS_TUNING)):
        if grid_name in args.tune:
            tune_constants(
                tuning, "window_scores[avg,attention_lse]", seq_len, scoring_module, grid,
                lambda: window_scores(query, key_cache, block_table, seq_lens, lse=lse,
                                      **score_kwargs),
                key_floor_ms,
            )  # fmt: skip
    scores = window_scores(query, key_cache, block_table, seq_lens, **score_kwargs)
    if args.sweep:
        sweep_fused(query, key_cache, block_table, seq_lens, score_kwargs, scores, sweep)

    budget = [int(args.retain_rate * seq_len)]
    keep = [int(args.tsp_rate * seq_len)]
    lens = [seq_len]
    measure(
        rows,
        "select_retained",
        seq_len,
        lambda: select_retained(scores, lens, budget, args.window),
        None,
    )
    measure(
        rows,
        "select_propagated",
        seq_len,
        lambda: select_propagated(scores, lens, keep, args.window),
        None,
    )
    measure(
        rows,
        "torch.topk alone",
        seq_len,
        lambda: scores.topk(budget[0] - args.window, dim=-1),
        None,
    )
    indices, counts = select_retained(scores, lens, budget, args.window)
    if args.check:
        budget_t, keep_t = (torch.tensor(v, device="cuda") for v in (budget, keep))
        ref_indices, _ = select_retained_ref(scores, seq_lens, budget_t, args.window)
        checks["select_retained_equal"] = bool(torch.equal(indices, ref_indices))
        checks["select_propagated_equal"] = bool(
            torch.equal(
                select_propagated(scores, lens, keep, args.window),
                select_propagated_ref(scores, seq_lens, keep_t, args.window),
            )
        )
    # Front compaction (entry r -> slot r), then tail-aligned (entry r -> slot S + r with
    # S = T - c' a block multiple, c' the budget rounded up to whole blocks).
    tail_start = (seq_len - int(counts)) // args.block_size * args.block_size
    tail_budget = [seq_len - tail_start]
    tail_indices, tail_counts = select_retained(scores, lens, tail_budget, args.window)
    starts = torch.tensor([tail_start], device="cuda")
    cases = [("", indices, counts, None), ("_tail", tail_indices, tail_counts, starts)]
    for suffix, idx, cnt, st in cases:

        def compaction(idx=idx, cnt=cnt, st=st) -> None:
            compact_kv(key_cache, value_cache, block_table, idx, cnt, starts=st)

        if args.check:
            expected = kv.clone()
            compact_kv_ref(
                *expected.transpose(1, 2).split(args.head_dim, dim=-1),
                block_table,
                idx,
                cnt,
                starts=st,
            )
            compaction()
            checks[f"compact{suffix}_bytes_equal"] = bool(
                torch.equal(kv.view(torch.uint8), expected.view(torch.uint8))
            )
            del expected
        # K and V, each read and written once. Repeating the move on the compacted cache
        # moves the same bytes, so timing repeated calls is fair.
        moved_bytes = 2 * 2 * int(cnt) * args.num_kv_heads * args.head_dim * elem
        measure(
            rows,
            f"compact_kv{suffix}[{args.retain_rate:g}]",
            seq_len,
            compaction,
            moved_bytes / bandwidth * 1e3,
        )
        if "compact" in args.tune:
            tune_constants(tuning, f"compact_kv{suffix}", seq_len, compaction_module,
                           COMPACT_TUNING, compaction, moved_bytes / bandwidth * 1e3)  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--retain-rate", type=float, default=0.1)
    parser.add_argument("--tsp-rate", type=float, default=0.2)
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the reference checks"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time the fused kernel's launch-shape grid"
    )
    parser.add_argument(
        "--tune", nargs="*", choices=TUNING_GRIDS, default=None,
        help="also time launch-constant grids: the mass kernel's (attention_lse path), its"
        " pooling launch's, compaction's (all when none is named)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tune == []:
        args.tune = list(TUNING_GRIDS)
    args.tune = args.tune or []

    bandwidth = copy_bandwidth()
    rows: list[dict] = []
    sweep: list[dict] = []
    tuning: list[dict] = []
    checks = [
        run_length(args, seq_len, bandwidth, rows, sweep, tuning) for seq_len in args.seq_lens
    ]
    properties = torch.cuda.get_device_properties(0)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": vars(args),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "l2_cache_mb": properties.L2_cache_size / 1e6,
        "sm_count": properties.multi_processor_count,
        "rows": rows,
        "checks": checks,
        "sweep": sweep,
        "tuning": tuning,
    }
    print(
        f"{results['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), "
        f"L2 {results['l2_cache_mb']:.0f} MB, {results['sm_count']} SMs"
    )
    header = ("op", "T", "call ms", "device ms", "span ms", "floor ms", "call/floor",
              "dev/floor", "span/floor")  # fmt: skip
    print(f"{header[0]:<34}" + "".join(f"{name:>11}" for name in header[1:]))
    for row in rows:
        floor = row["floor_ms"]
        span = f"{row['span_ms']:>11.4f}" if row["span_ms"] else f"{'':>11}"
        tail = (
            f"{floor:>11.4f}{row['call_x_floor']:>11.2f}{row['device_x_floor']:>11.2f}"
            + (f"{row['span_x_floor']:>11.2f}" if "span_x_floor" in row else "")
            if floor
            else ""
        )
        print(
            f"{row['op']:<34}{row['seq_len']:>11}{row['call_ms']:>11.3f}{row['device_ms']:>11.4f}"
            f"{span}{tail}"
        )
        if len(row["kernels_ms"]) > 1:
            for kernel, ms in row["kernels_ms"].items():
                print(f"    {ms:.4f} ms  {kernel[:90]}")
    print_scoring_summary(rows, sweep)
    print_tuning(tuning)
    for check in checks:
        print(
            "checks:",
            ", ".join(
                f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()
            ),
        )
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
