"""Do a decoder layer's GEMMs run slower after the packed decode kernel than after a
16-bit attention? (In every low-bit engine profiled, the same cuBLAS GEMMs took longer
than in the 16-bit engine of the same job: docs/BENCHMARKS.md, "tenth run".)

    python benchmarks/gemm_after_attention.py --out gemm_after.json

Needs torch and triton only. 32 "layers" of Llama-3.1-8B decode shapes at batch 16
(attention, o_proj, add + RMS norm, gate/up, SiLU, down, add + RMS norm, qkv; random
weights, the same for every layer) captured in one CUDA graph, the attention being the
packed 2-bit kernel over the rows of ``bench_packed_decode.py`` (32K prompts, retain 0.1),
PyTorch's SDPA over as many 16-bit keys and values, or nothing. Two rounds of the three;
each graph replayed 30 times under the profiler; the median time of every kernel. SM and
memory clocks, power and temperature are sampled every 50 ms beside (``OUT.smi.csv``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from bench_packed_decode import packed_batch
from torch.profiler import ProfilerActivity, profile

from vllm_fastkv.kernels import packed_decode_attention

HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 6144
BATCH, LAYERS = 16, 32


class Layers:
    """The decode layers of one run, on random weights."""

    def __init__(self, prompt_len: int, retain_rate: float) -> None:
        shape = argparse.Namespace(batch=BATCH, prompt_len=prompt_len, retain_rate=retain_rate,
                                   residual=128, num_q_heads=32, num_kv_heads=8, head_dim=128,
                                   block_size=16, value_group=32, pack_due=False)  # fmt: skip
        self.inputs, self.layout, _, _ = packed_batch(shape, 2)
        self.attn_out = torch.empty_like(self.inputs[0])
        self.arrivals = torch.zeros(BATCH * 9, dtype=torch.int32, device="cuda")
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
        if kind == "packed":
            packed_decode_attention(*self.inputs, self.attn_out, scale=0.088,
                                    layout=self.layout, arrivals=self.arrivals,
                                    pack_pages=self.no_pages)  # fmt: skip
            return self.attn_out.view(BATCH, HIDDEN)
        if kind == "sdpa":
            out = F.scaled_dot_product_attention(self.q16, self.k16, self.v16, enable_gqa=True)
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
    times: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            times.setdefault(event.name[:80], []).append(event.time_range.elapsed_us())
    ranked = sorted(times.items(), key=lambda item: -sum(item[1]))
    return {"wall_ms": wall_ms, "kernels": [
        {"name": name, "median_us": statistics.median(spans), "count": len(spans)}
        for name, spans in ranked[:10]
    ]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-len", type=int, default=32768)
    parser.add_argument("--retain-rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    layers = Layers(args.prompt_len, args.retain_rate)
    with open(args.out + ".smi.csv", "w") as log:
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,"
             "temperature.gpu", "--format=csv,noheader", "-lms", "50"], stdout=log,
        )  # fmt: skip
        try:
            runs = {}
            for round_ in range(args.rounds):
                for kind in ("packed", "sdpa", "none"):
                    run = kernel_medians(layers, kind, args.replays)
                    runs[f"{kind}{round_}"] = run
                    print(f"== attention {kind}, round {round_}: {args.replays} replays of "
                          f"{LAYERS} layers in {run['wall_ms']:.0f} ms", flush=True)
                    for kernel in run["kernels"]:
                        print(f"   {kernel['median_us']:8.2f} us x{kernel['count']:5d}  "
                              f"{kernel['name']}", flush=True)  # fmt: skip
        finally:
            smi.terminate()
    result = {"device": torch.cuda.get_device_name(), "config": vars(args), "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
