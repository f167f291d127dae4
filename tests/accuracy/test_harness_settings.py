"""The harness's settings plumbing, without a model: which methods the scoring flags reach
and how the report labels their rows."""

from __future__ import annotations

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
