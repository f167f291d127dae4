"""The harness's settings plumbing, without a model: which methods the scoring flags reach,
how the report labels their rows, and how reruns merge into the rows file."""

from __future__ import annotations

import json

from benchmarks.accuracy import harness, report


def test_scoring_flags_reach_scored_methods_only():
    """--window/--pooling/--pool-kernel change the scored methods' settings and their report
    label; stock, disabled and the recency baseline are the same rows whatever the flags."""
    args = harness.parser().parse_args(["--window", "32", "--pooling", "max"])
    scoring = harness.scoring_overrides(args)
    assert scoring == {"window": 32, "pooling": "max"}
    assert harness.method_settings("retention", 0.1, 0.2, scoring) == {
        "retain_rate": 0.1, "tsp_rate": 1.0, "window": 32, "pooling": "max"}  # fmt: skip
    assert harness.method_settings("fastkv", 0.1, 0.2, scoring)["window"] == 32
    assert harness.method_settings("retention_2bit", 0.1, 0.2, scoring)["pooling"] == "max"
    mixed = harness.method_settings("mixed_2bit", 0.1, 0.2, scoring)
    assert (mixed["evicted_bits"], mixed["tsp_rate"], mixed["window"]) == (2, 1.0, 32)
    assert "window" not in harness.method_settings("recency", 0.1, 0.2, scoring)
    assert harness.method_settings("stock", 0.1, 0.2, scoring) is None
    assert harness.method_settings("disabled", 0.1, 0.2, scoring) == {"enabled": False}
    row = {"method": "retention", "settings": harness.method_settings("retention", 0.1, 0.2,
                                                                      scoring)}
    assert report.label(row) == "retention retain 0.1 window 32 pooling max"
    row["settings"] = harness.method_settings("retention", 0.1, 0.2)
    assert report.label(row) == "retention retain 0.1"


def test_tsp_layer_reaches_the_fastkv_method_only():
    """--tsp-layer sets the one method that propagates; its rows are their own label."""
    args = harness.parser().parse_args(["--tsp-layer", "13", "--window", "16"])
    scoring = harness.scoring_overrides(args)
    fastkv = harness.method_settings("fastkv", 0.1, 0.2, scoring, args.tsp_layer)
    assert fastkv == {"retain_rate": 0.1, "tsp_rate": 0.2, "tsp_layer": 13, "window": 16}
    for method in ("retention", "recency", "mixed_4bit", "disabled"):
        assert "tsp_layer" not in harness.method_settings(method, 0.1, 0.2, scoring, 13)
    assert harness.method_settings("stock", 0.1, 0.2, scoring, 13) is None
    assert "tsp_layer" not in harness.method_settings("fastkv", 0.1, 0.2, scoring)
    row = {"method": "fastkv", "settings": fastkv}
    assert report.label(row) == "fastkv retain 0.1 window 16 tsp_layer 13"


def test_merge_rows_replaces_the_same_measurement_and_keeps_one_row_a_line(tmp_path):
    """A rerun replaces the rows of the same model, device, method, settings and cell,
    keeps every other row, and the file stays one JSON row per line."""
    def row(method: str, depth: float, score: float, window: int | None = None) -> dict:
        settings = {"retain_rate": 0.1} | ({"window": window} if window else {})
        return {"date": "d", "device": "H200", "commit": "c", "model": "m", "method": method,
                "settings": settings, "task": "passkey", "context_len": 2048,
                "depth": depth, "score": score, "n": 2}  # fmt: skip

    path = tmp_path / "rows.json"
    first = [row("fastkv", 0.1, 0.0), row("fastkv", 0.5, 0.5), row("retention", 0.1, 1.0)]
    assert harness.merge_rows(path, first) == first
    rerun = [row("fastkv", 0.1, 1.0), row("fastkv", 0.1, 0.5, window=16)]
    merged = harness.merge_rows(path, rerun)
    assert merged == [first[1], first[2], *rerun]
    lines = path.read_text().splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == len(merged) + 2
    assert [json.loads(line.rstrip(",")) for line in lines[1:-1]] == merged
    assert json.loads(path.read_text()) == merged


def test_reference_parser_is_the_grid_plus_model_dir_and_a_record():
    """The torch-reference scripts share the harness's grid flags; their --out is opt-in."""
    p = harness.reference_parser("A script.\n\nMore text.")
    assert p.description == "A script."
    args = p.parse_args(["--model-dir", "d", "--lengths", "2048", "--window", "16"])
    assert (args.model_dir, args.out, args.lengths, args.window) == ("d", None, [2048], 16)
    assert args.tasks == list(harness.TASKS) and args.tsp_rate == 0.2


def test_reference_record_names_its_provenance(tmp_path, monkeypatch):
    """A reference script's --out names date, device, commit and the --model-name (else the
    directory's name) before its own fields; without --out nothing is written."""
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    out = tmp_path / "record.json"
    p = harness.reference_parser("A script.")
    args = p.parse_args(["--model-dir", str(tmp_path / "q05"), "--out", str(out),
                         "--model-name", "Qwen2.5-Coder-0.5B-Instruct"])  # fmt: skip
    harness.write_reference_record(args, {"means": {"a": 0.5}})
    record = json.loads(out.read_text())
    assert list(record) == ["date", "device", "commit", "model", "means"]
    assert record["commit"] == "abc1234" and record["model"] == "Qwen2.5-Coder-0.5B-Instruct"
    assert record["means"] == {"a": 0.5}
    args = p.parse_args(["--model-dir", str(tmp_path / "q05"), "--out", str(out)])
    harness.write_reference_record(args, {})
    assert json.loads(out.read_text())["model"] == "q05"
    out.unlink()
    harness.write_reference_record(p.parse_args(["--model-dir", "d"]), {"means": {}})
    assert not out.exists()
