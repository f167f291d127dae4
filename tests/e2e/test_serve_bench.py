"""``benchmarks/serve_bench.py`` end to end on CPU, at the smoke shape.

The benchmark runs on the GPU machine only when device time is scarce, so a broken
option or record there costs a session. Here one FASTKV engine (retention + 2-bit pages)
runs each kind of measurement once in a worker process, as on the GPU; the figures are
CPU ones and only their presence and consistency are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.engines import REPO_ROOT, engine_env

SETTINGS = {"retain_rate": 0.1, "tsp_rate": 1.0, "kv_bits": 2}


def test_serve_bench_records_every_kind(tmp_path):
    out = tmp_path / "serve_bench.json"
    cmd = [
        sys.executable, "benchmarks/serve_bench.py", "--shape", "smoke",
        "--model-dir", str(tmp_path / "models"), "--max-model-len", "1024",
        "--decode-tokens", "32", "--reps", "1", "--ttft-lens", "256", "--decode-lens", "256",
        "--batches", "2", "--profile-decode-lens", "256", "--profile-batch", "2",
        "--profile-steps", "2", "--profile-skip", "1", "--concurrency-len",
        "--backends", "FASTKV", "--fastkv", json.dumps(SETTINGS), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env=engine_env())  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["kind"]: r for r in json.loads(out.read_text())}
    # A bare --concurrency-len reached the worker as "none" (it once fell back to defaults).
    assert sorted(records) == ["decode", "profile_decode", "ttft"]
    assert all(r["fastkv"] == SETTINGS and r["backend"] == "FASTKV" for r in records.values())
    decode = records["decode"]
    # TPOT is the time of the steps after every request's first token, over the output
    # tokens: one step a token (the batch fits), each timed.
    assert decode["output_tokens"] == 32 and decode["fits_kv_pool"]
    assert decode["total_s"] > decode["prefill_s"] > 0
    steps = decode["decode_step_ms"]
    assert 32 <= steps["steps"] <= 34 and 0 < steps["median"] <= steps["max"]
    decode_s = decode["total_s"] - decode["prefill_s"]
    assert abs(decode["tpot_ms"] - 1000 * decode_s / 32) < 0.01 * decode["tpot_ms"]
    assert steps["steps"] * steps["median"] < 2 * 1000 * decode_s
    profile = records["profile_decode"]
    assert (profile["steps"], profile["skipped_steps"], profile["batch"]) == (2, 1, 2)
    assert profile["wall_ms"] > 0
    assert len(profile["skip_step_ms"]) == 1 and profile["skip_step_ms"][0] > 0
    assert profile["prefill_step_ms"] and all(ms > 0 for ms in profile["prefill_step_ms"])
