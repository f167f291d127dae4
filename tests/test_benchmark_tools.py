"""Benchmark tooling that runs without a GPU: joining Nsight Compute's CSV to the packed
decode benchmark's configurations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.engines import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_packed_decode import ncu_rows  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')  # fmt: skip


def _ncu_csv(values: list[tuple[int, str, str]]) -> str:
    """ncu ``--csv`` text as it prints it: banner lines, the header, one metric a line."""
    lines = ["==PROF== Connected to process 1 (python3)", "launch 2-bit tile_blocks=4", HEADER]
    for launch, name, value in values:
        lines.append(f'"{launch}","1","python3","127.0.0.1","_packed_decode_kernel","1","7",'
                     f'"(128, 1, 1)","(16, 8, 8)","0","9.0","Command line profiler metrics",'
                     f'"{name}","cycle","{value}"')  # fmt: skip
    return "\n".join(lines + ["==PROF== Disconnected from process 1"])


def test_ncu_rows_take_the_second_launch_of_each_configuration(tmp_path):
    launches = [{"bits": 2, "tile_blocks": 4, "num_warps": 4, "num_stages": 1, "splits": 8},
                {"bits": 4, "tile_blocks": 2, "num_warps": 4, "num_stages": 1, "splits": 5}]
    # A --ncu run compiles every configuration first (launches 0 and 1), then launches
    # them again in the same order (2 and 3): those are the ones to report.
    cycles, registers = "sm__cycles_elapsed.max", "launch__registers_per_thread"
    text = _ncu_csv([(0, cycles, "999,999"), (1, cycles, "1"), (2, cycles, "117,113"),
                     (2, registers, "128"), (3, cycles, "156,636"), (3, registers, "n/a")])
    rows = ncu_rows(text, launches)
    assert [row["ncu"][cycles] for row in rows] == [117113.0, 156636.0]
    assert rows[0]["ncu"][registers] == 128.0
    assert rows[1]["ncu"][registers] == "n/a"
    assert rows[1]["bits"] == 4

    # The command line joins the same two files and needs no GPU.
    (tmp_path / "order.json").write_text(json.dumps({"launch_order": launches}))
    (tmp_path / "ncu.csv").write_text(text)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_packed_decode.py"),
         "--out", str(tmp_path / "order.json"), "--ncu-table", str(tmp_path / "ncu.csv")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits=2 tile_blocks=4 num_warps=4 num_stages=1 splits=8" in proc.stdout
    assert "sm__cycles_elapsed.max=117113" in proc.stdout


def test_ncu_rows_refuse_a_csv_that_does_not_match_the_launches():
    text = _ncu_csv([(0, "sm__cycles_elapsed.max", "1"), (1, "sm__cycles_elapsed.max", "2")])
    with pytest.raises(ValueError, match="2 profiled launches for 2 configurations"):
        ncu_rows(text, [{"bits": 2}, {"bits": 4}])
