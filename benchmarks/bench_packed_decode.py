"""Decode attention over low-bit packed pages on one GPU: time per layer vs its HBM floor.

    python benchmarks/bench_packed_decode.py --out packed_decode.json

Needs torch and triton only. One layer of a decode step at Llama-3.1-8B head shapes
(32 query / 8 KV heads of 128, block 16, bf16): ``--batch`` rows, each with the KV that
retention keeps of a ``--prompt-len`` prompt (``--retain-rate``), its oldest tokens
packed at 2 and 4 bits as the engine packs them (all but the last ``--residual`` tokens,
in whole pages), the rest full precision; rows' blocks shuffled over the cache as a
serving pool hands them out (``--blocks-in-order``: consecutive). For each bit width, tile size
(``tile_blocks``: blocks of a page attended per iteration), warps per program, pipeline
stages of the tile loop and split count (``splits``: programs per (row, KV head), ``*``
the kernel's own choice) it reports the time of
:func:`~vllm_fastkv.kernels.packed_decode_attention` (the median of ``--rounds``
``do_bench`` medians, L2 flushed, taken over all configurations in turn), its floor
(packed page bytes + full-precision tail bytes read once / measured copy bandwidth) and
the relative error against the torch reference. The launch is the engine's: persistent
arrival counts, and no row packing a page (``--pack-due`` adds, for each configuration,
the launch of a step where every row also packs its next page after attending, as one
decode step per page does). With ``--ncu`` it times nothing and
launches each configuration twice (compile, then the launch to profile):

    ncu --clock-control none -k regex:_packed_decode_kernel \
      --metrics sm__cycles_elapsed.max,launch__registers_per_thread \
      python benchmarks/bench_packed_decode.py --out x.json --ncu ... > ncu.csv
    python benchmarks/bench_packed_decode.py --out x.json --ncu-table ncu.csv

The second command (no GPU needed) joins the profiled launches' metrics to the
configurations recorded in ``x.json`` and prints them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import statistics
from collections import defaultdict

import torch
import triton
import triton.testing
from bench_kernels import copy_bandwidth  # the same floor as the other kernel benchmarks

from vllm_fastkv.kernels import pack_kv, packed_decode_attention, packed_decode_attention_ref
from vllm_fastkv.kernels.packed_attention import (
    DEFAULT_NUM_STAGES,
    MAX_REGISTERS,
    decode_splits,
)
from vllm_fastkv.packed_layout import LowBitLayout


def packed_batch(args: argparse.Namespace, bits: int):
    """A batch of rows as the engine leaves them after retention and packing."""
    gen = torch.Generator(device="cuda").manual_seed(bits)
    kept = int(args.prompt_len * args.retain_rate)
    blocks_per_row = triton.cdiv(kept + 1, args.block_size)
    num_blocks = args.batch * blocks_per_row + 8
    kv = torch.randn(num_blocks, args.block_size, args.num_kv_heads, 2 * args.head_dim,
                     device="cuda", generator=gen).to(torch.bfloat16)  # fmt: skip
    key_cache, value_cache = kv.split(args.head_dim, dim=-1)
    layout = LowBitLayout.for_cache(key_cache, bits, args.value_group)
    if args.blocks_in_order:
        order = torch.arange(args.batch * blocks_per_row, device="cuda")
    else:  # as a serving pool hands blocks out after a while
        order = torch.randperm(num_blocks, device="cuda", generator=gen)
    order = order[: args.batch * blocks_per_row]
    block_table = order.view(args.batch, blocks_per_row).to(torch.int32)
    pages = max(0, (kept - args.residual) // layout.page_tokens)
    per_page = layout.blocks_per_page
    groups = block_table[:, : pages * per_page].reshape(args.batch * pages, per_page)
    pack_kv(key_cache, value_cache, groups.contiguous(), layout)
    packed = torch.full((args.batch,), pages, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((args.batch,), kept + 1, dtype=torch.int32, device="cuda")
    qsl = torch.arange(args.batch + 1, dtype=torch.int32, device="cuda")
    query = torch.randn(args.batch, args.num_q_heads, args.head_dim, device="cuda",
                        generator=gen).to(torch.bfloat16)  # fmt: skip
    inputs = (query, key_cache, value_cache, block_table, qsl, seq_lens, packed)
    tail_tokens = kept + 1 - pages * layout.page_tokens
    if args.pack_due and tail_tokens < layout.page_tokens:
        raise ValueError(f"--pack-due needs a full-precision page behind the packed ones: "
                         f"{tail_tokens} tail tokens, {layout.page_tokens} a page")
    floor_bytes = args.batch * (
        pages * per_page * layout.num_kv_heads * layout.head_bytes
        + tail_tokens * args.num_kv_heads * args.head_dim * 2 * 2
    )
    return inputs, layout, pages, floor_bytes


def ncu_rows(csv_text: str, launches: list[dict]) -> list[dict]:
    """Nsight Compute's ``--csv`` output (one metric a line; other lines ignored) joined
    to ``launches``, the configurations in launch order. A ``--ncu`` run launches every
    configuration once to compile it (and check its error) and then, in a second loop,
    once more in the same order: the second half of the profiled launches is the one
    whose metrics count."""
    lines = [line for line in csv_text.splitlines() if line.startswith('"')]
    metrics: dict[int, dict[str, float | str]] = defaultdict(dict)
    for record in csv.DictReader(lines):
        value = record["Metric Value"].replace(",", "")
        try:
            metrics[int(record["ID"])][record["Metric Name"]] = float(value)
        except ValueError:
            metrics[int(record["ID"])][record["Metric Name"]] = value
    ids = sorted(metrics)
    if len(ids) != 2 * len(launches):
        raise ValueError(f"{len(ids)} profiled launches for {len(launches)} configurations "
                         "launched twice each")  # fmt: skip
    profiled = ids[len(launches):]
    return [{**config, "ncu": metrics[profiled[i]]} for i, config in enumerate(launches)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32768)
    parser.add_argument("--retain-rate", type=float, default=0.1)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--value-group", type=int, default=32)
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tile-blocks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-stages", type=int, nargs="+", default=[DEFAULT_NUM_STAGES])
    parser.add_argument("--max-registers", type=int, nargs="+", default=[MAX_REGISTERS],
                        help="register caps a thread of the kernel may use")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks-in-order", action="store_true",
                        help="rows' blocks consecutive in the cache instead of shuffled")
    parser.add_argument("--pack-due", action="store_true",
                        help="also time each configuration with every row packing a page")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timings of every configuration, interleaved; the median is kept")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench time per timing")
    parser.add_argument("--ncu", action="store_true",
                        help="time nothing: launch every configuration once more after its "
                             "compiling launch, in the order printed, for Nsight Compute's "
                             "clock-independent cycle counts (timings vary up to 3x between "
                             "machines)")  # fmt: skip
    parser.add_argument("--ncu-table", metavar="CSV",
                        help="print the metrics of an Nsight Compute CSV of a --ncu run "
                             "against the configurations it wrote to --out (no GPU)")  # fmt: skip
    args = parser.parse_args()
    if args.ncu_table:
        with open(args.out) as f:
            launches = json.load(f)["launch_order"]
        with open(args.ncu_table) as f:
            for row in ncu_rows(f.read(), launches):
                config = " ".join(f"{key}={row[key]}" for key in
                                  ("bits", "tile_blocks", "num_warps", "num_stages", "splits",
                                   "max_registers")
                                  if key in row)  # records of runs before the register cap
                print(config, " ".join(f"{name}={value:g}" if isinstance(value, float)
                                       else f"{name}={value}"
                                       for name, value in row["ncu"].items()))  # fmt: skip
        return
    bandwidth = copy_bandwidth()
    default = decode_splits(args.batch, args.num_kv_heads, torch.device("cuda"))
    cases = []
    for bits in args.bits:
        inputs, layout, pages, floor_bytes = packed_batch(args, bits)
        scale = args.head_dim**-0.5
        ref = packed_decode_attention_ref(*inputs, torch.zeros_like(inputs[0]), scale=scale,
                                          layout=layout).float()  # fmt: skip
        floor_ms = floor_bytes / bandwidth * 1e3
        configs = itertools.product(args.tile_blocks, args.num_warps, args.num_stages,
                                    sorted({*args.splits, default}), args.max_registers,
                                    [False, True] if args.pack_due else [False])
        rows = args.batch
        arrivals = torch.zeros(rows * (args.num_kv_heads + 1), dtype=torch.int32, device="cuda")
        stage = torch.empty(rows, layout.page_bytes // 4, dtype=torch.int32, device="cuda")
        pristine = (inputs[1].clone(), inputs[2].clone()) if args.pack_due else None
        for tile_blocks, warps, stages, splits, registers, due in configs:
            if tile_blocks > layout.blocks_per_page:
                continue  # the same tile as a whole page, masked wider
            # Every row packing the page after its packed ones, or none (timed calls pack
            # the page again each time: the same work, whatever the blocks hold).
            pack = torch.full((rows,), pages if due else -1, dtype=torch.int32, device="cuda")
            out = torch.full_like(inputs[0], float("nan"))
            call = functools.partial(packed_decode_attention, *inputs, out, scale=scale,
                                     layout=layout, splits=splits, tile_blocks=tile_blocks,
                                     num_warps=warps, num_stages=stages,
                                     max_registers=registers, arrivals=arrivals,
                                     pack_pages=pack, stage=stage)  # fmt: skip
            call()  # compiles, and fills ``out`` for the error check
            err = ((out.float() - ref).norm() / ref.norm()).item()
            cases.append((call, {"bits": bits, "splits": splits, "tile_blocks": tile_blocks,
                                 "num_warps": warps, "num_stages": stages,
                                 "max_registers": registers, "pack_due": due,
                                 "default_splits": splits == default, "pages_per_row": pages,
                                 "floor_ms": floor_ms, "rel_error": err, "ms_rounds": []}))
            if due:
                # Undo the packing, so the next configuration's check sees the blocks.
                inputs[1].copy_(pristine[0])
                inputs[2].copy_(pristine[1])
    if args.ncu:
        for call, row in cases:
            call()
            print(f"launch {row['bits']}-bit tile_blocks={row['tile_blocks']} "
                  f"warps={row['num_warps']} stages={row['num_stages']} splits={row['splits']} "
                  f"registers={row['max_registers']}")
        torch.cuda.synchronize()
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "config": vars(args),
                       "launch_order": [row for _, row in cases]}, f, indent=2)  # fmt: skip
        return
    # Rounds over all configurations in turn: a drift of the GPU's clocks or of a
    # neighbour's load during the sweep then lands on every configuration, not on a few.
    for _ in range(args.rounds):
        for call, row in cases:
            row["ms_rounds"].append(triton.testing.do_bench(call, warmup=25, rep=args.rep_ms,
                                                            return_mode="median"))
    rows = []
    for _, row in cases:
        ms = statistics.median(row["ms_rounds"])
        rows.append({**row, "ms": ms, "x_floor": ms / row["floor_ms"]})
        print(f"{row['bits']}-bit tile_blocks={row['tile_blocks']} warps={row['num_warps']} "
              f"stages={row['num_stages']} splits={row['splits']:>2} "
              f"{'pack ' if row['pack_due'] else ''}"
              f"regs={row['max_registers']:>3}"
              f"{'*' if row['default_splits'] else ' '} {ms * 1e3:8.1f} us "
              f"({min(row['ms_rounds']) * 1e3:.1f}-{max(row['ms_rounds']) * 1e3:.1f})  "
              f"floor {row['floor_ms'] * 1e3:6.1f} us  x{ms / row['floor_ms']:6.2f}  "
              f"err {row['rel_error']:.1e}", flush=True)  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "config": vars(args),
              "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
