"""Do a decoder layer's GEMMs run slower after the packed decode kernel than after a
16-bit attention? (In every low-bit engine profiled until then, the same cuBLAS GEMMs took
longer than in the 16-bit engine of the same job: docs/BENCHMARKS.md, "tenth run".) On
three machines they did with the kernel at 8 splits a (row, KV head), two waves of
programs, and did not at 4, one wave, the engine's choice since; on a fourth the gate/up
GEMM ran faster after 8 splits (docs/BENCHMARKS.md, "eleventh run"). ``--splits`` sets it.

    python benchmarks/gemm_after_attention.py --out gemm_after.json [--splits 8]

Needs torch and triton only. 32 "layers" of Llama-3.1-8B decode shapes at batch 16
(attention, o_proj, add + RMS norm, gate/up, SiLU, down, add + RMS norm, qkv; random
weights, the same for every layer) captured in one CUDA graph, the attention being one of
``--kinds``:

* ``packed``: the packed 2-bit kernel over the rows of ``bench_packed_decode.py`` (32K
  prompts, retain 0.1, blocks in shuffled order as a serving pool hands them out);
* ``packed_in_order``: the same rows with their blocks in order (scattered reads or not);
* ``packed_then_stream``: ``packed``, then a 256 MiB read (whatever the packed kernel
  leaves in L2 is gone before o_proj);
* ``packed_carveout_max`` / ``packed_carveout_min``: ``packed`` with its preferred
  shared-memory carveout set to 100% / 0% (the driver's choice otherwise: an SM that
  must change its L1 / shared split for the next kernel drains first);
* ``packed_then_alu``: ``packed``, then ~2 us of ``alu`` on every SM (whatever the packed
  kernel leaves in an SM rather than in L2);
* ``alu``: a Triton kernel of arithmetic alone on every SM for about as long (power, no
  memory);
* ``sdpa``: PyTorch's SDPA over as many 16-bit keys and values;
* ``sdpa_then_write``: ``sdpa``, then a 2 MiB write (as much as the packed kernel's split
  partials at 8 splits: dirty lines in L2);
* ``none``: no attention.

Each graph is replayed ``--replays`` times under the profiler, ``--rounds`` rounds of all
kinds; per kernel the median time, and the median gap from the previous kernel's end to
its start (negative: it started early, as a programmatic dependent launch may, and its
duration includes a wait). SM and memory clocks, power and temperature are sampled every
50 ms beside (``OUT.smi.csv``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from bench_packed_decode import packed_batch
from torch.profiler import ProfilerActivity, profile

from vllm_fastkv.kernels import packed_attention, packed_decode_attention

HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 6144
BATCH, LAYERS = 16, 32


KINDS = ("packed", "packed_in_order", "packed_then_stream", "packed_carveout_max",
         "packed_carveout_min", "packed_then_alu", "alu", "sdpa", "sdpa_then_write", "none")
CARVEOUTS = {"packed_carveout_max": 100, "packed_carveout_min": 0}
# CUfunction_attribute CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
_CARVEOUT_ATTRIBUTE = 9


def set_carveout(kernel: triton.runtime.JITFunction, percent: int) -> None:
    """The preferred shared-memory carveout (-1: the driver's) of every compiled variant of
    ``kernel`` on the current device."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    for compiled in kernel.device_caches[torch.cuda.current_device()][0].values():
        compiled._init_handles()
        status = libcuda.cuFuncSetAttribute(ctypes.c_void_p(compiled.function),
                                            _CARVEOUT_ATTRIBUTE, percent)  # fmt: skip
        if status != 0:
            raise RuntimeError(f"cuFuncSetAttribute: CUresult {status}")


@triton.jit
def _alu_kernel(out_ptr, iterations, BLOCK: tl.constexpr):
    """Dependent fp32 multiply-adds in registers, one store: arithmetic, no traffic."""
    x = tl.arange(0, BLOCK).to(tl.float32) * 1e-3
    for _ in range(iterations):
        x = x * 0.999 + 0.001
        x = x * 1.001 - 0.001
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), x)


class Layers:
    """The decode layers of one run, on random weights."""

    def __init__(self, prompt_len: int, retain_rate: float, splits: int | None) -> None:
        shape = argparse.Namespace(batch=BATCH, prompt_len=prompt_len, retain_rate=retain_rate,
                                   residual=128, num_q_heads=32, num_kv_heads=8, head_dim=128,
                                   block_size=16, value_group=32, pack_due=False,
                                   blocks_in_order=False)  # fmt: skip
        self.inputs, self.layout, _, _ = packed_batch(shape, 2)
        shape.blocks_in_order = True
        self.in_order, _, _, _ = packed_batch(shape, 2)
        self.stream = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        self.stream_sum = torch.empty((), dtype=torch.int64, device="cuda")
        self.dirty = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.alu_out = torch.empty(4 * sms, 512, device="cuda")
        self.alu_iterations = 1
        self.short_alu_iterations = 1
        self.attn_out = torch.empty_like(self.inputs[0])
        self.arrivals = torch.zeros(BATCH * 9, dtype=torch.int32, device="cuda")
        self.splits = splits
        self.no_pages = torch.full((BATCH,), -1, dtype=torch.int32, device="cuda")
        kept = int(prompt_len * retain_rate) + 1
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        self.q16 = torch.randn(BATCH, 32, 1, 128, **bf16)
        self.k16 = torch.randn(BATCH, 8, kept, 128, **bf16)
        self.v16 = torch.randn_like(self.k16)
        self.w_o = torch.randn(HIDDEN, HIDDEN, **bf16) * 0.01
        self.w_gate_up = torch.randn(HIDDEN, 2 * INTERMEDIATE, **bf16) * 0.01
        self.w_down = torch.randn(INTERMEDIATE, HIDDEN, **bf16) * 0.01
        self.w_qkv = torch.randn(HIDDEN, QKV, **bf16) * 0.01
        self.x = torch.randn(BATCH, HIDDEN, **bf16)
        self.norm_weight = torch.ones(HIDDEN, **bf16)

    def attention(self, kind: str) -> torch.Tensor:
        if kind.startswith("packed"):
            inputs = self.in_order if kind == "packed_in_order" else self.inputs
            packed_decode_attention(*inputs, self.attn_out, scale=0.088, layout=self.layout,
                                    arrivals=self.arrivals, pack_pages=self.no_pages,
                                    splits=self.splits)  # fmt: skip
            set_carveout(packed_attention._packed_decode_kernel, CARVEOUTS.get(kind, -1))
            if kind == "packed_then_stream":
                torch.sum(self.stream, dim=0, dtype=torch.int64, out=self.stream_sum)
            if kind == "packed_then_alu":
                _alu_kernel[(self.alu_out.shape[0],)](self.alu_out, self.short_alu_iterations,
                                                      BLOCK=512)  # fmt: skip
            return self.attn_out.view(BATCH, HIDDEN)
        if kind == "alu":
            _alu_kernel[(self.alu_out.shape[0],)](self.alu_out, self.alu_iterations, BLOCK=512)
            return self.x
        if kind.startswith("sdpa"):
            out = F.scaled_dot_product_attention(self.q16, self.k16, self.v16, enable_gqa=True)
            if kind == "sdpa_then_write":
                self.dirty.fill_(1)
            return out.view(BATCH, HIDDEN)
        return self.x

    def layer(self, kind: str) -> torch.Tensor:
        h = self.norm(self.attention(kind) @ self.w_o + self.x)
        gate, up = (h @ self.w_gate_up).chunk(2, dim=-1)
        h = self.norm((F.silu(gate) * up) @ self.w_down + self.x)
        return h @ self.w_qkv

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (HIDDEN,), self.norm_weight, 1e-5)


def kernel_medians(layers: Layers, kind: str, replays: int) -> dict:
    """Wall time of ``replays`` replays of a graph of ``LAYERS`` layers, and each kernel's
    median time (us) and count under the profiler."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3 * LAYERS):
            layers.layer(kind)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            layers.layer(kind)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start)
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                    key=lambda e: e.time_range.start)  # fmt: skip
    times: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    for previous, event in zip([None, *events], events):
        times.setdefault(event.name[:80], []).append(event.time_range.elapsed_us())
        if previous is not None:
            gap = event.time_range.start - previous.time_range.end
            gaps.setdefault(event.name[:80], []).append(gap)
    ranked = sorted(times.items(), key=lambda item: -sum(item[1]))
    return {"wall_ms": wall_ms, "kernels": [
        {"name": name, "median_us": statistics.median(spans), "count": len(spans),
         "median_gap_us": statistics.median(gaps[name]) if name in gaps else None}
        for name, spans in ranked[:12]
    ]}  # fmt: skip


def calibrate_alu(layers: Layers, target_us: float) -> None:
    """Iterations of the arithmetic kernel that take about ``target_us``."""
    def time_us(iterations: int) -> float:
        layers.alu_iterations = iterations
        return triton.testing.do_bench(lambda: layers.attention("alu"), warmup=5, rep=20) * 1e3

    iterations = 256
    while time_us(iterations) < target_us and iterations < 1 << 22:
        iterations *= 2
    layers.alu_iterations = max(1, int(iterations * target_us / time_us(iterations)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-len", type=int, default=32768)
    parser.add_argument("--retain-rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--splits", type=int, default=None,
                        help="the packed kernel's splits (default: as the engine picks them)")
    args = parser.parse_args()
    layers = Layers(args.prompt_len, args.retain_rate, args.splits)
    if "packed_then_alu" in args.kinds:
        calibrate_alu(layers, 2.0)
        layers.short_alu_iterations = layers.alu_iterations
    if "alu" in args.kinds:
        packed_us = triton.testing.do_bench(lambda: layers.attention("packed")) * 1e3
        calibrate_alu(layers, packed_us)
    with open(args.out + ".smi.csv", "w") as log:
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,"
             "temperature.gpu", "--format=csv,noheader", "-lms", "50"], stdout=log,
        )  # fmt: skip
        try:
            runs = {}
            for round_ in range(args.rounds):
                for kind in args.kinds:
                    run = kernel_medians(layers, kind, args.replays)
                    runs[f"{kind}{round_}"] = run
                    print(f"== attention {kind}, round {round_}: {args.replays} replays of "
                          f"{LAYERS} layers in {run['wall_ms']:.0f} ms", flush=True)
                    for kernel in run["kernels"]:
                        gap = kernel["median_gap_us"]
                        print(f"   {kernel['median_us']:8.2f} us x{kernel['count']:5d}  gap "
                              f"{'-' if gap is None else f'{gap:6.2f}'} us  {kernel['name']}",
                              flush=True)  # fmt: skip
        finally:
            smi.terminate()
    result = {"device": torch.cuda.get_device_name(), "config": vars(args), "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
