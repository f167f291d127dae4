"""Merge serve_bench.py results into docs/benchmarks.json and plot TTFT/TPOT vs context.

    python benchmarks/report.py RESULTS.json [RESULTS.json ...] \
        [--db docs/benchmarks.json] [--plot docs/ttft_tpot.png]

Records are appended to the JSON list in --db (skipping exact duplicates), so every GPU
run adds to one history; the plot shows, for the newest run of each backend in the given
files, TTFT (batch 1) and TPOT (batch 1) against prompt length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(db_path: Path, new_records: list[dict]) -> list[dict]:
    db = json.loads(db_path.read_text()) if db_path.exists() else []
    seen = {json.dumps(r, sort_keys=True) for r in db}
    for record in new_records:
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            db.append(record)
            seen.add(key)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db_path.write_text(json.dumps(db, indent=1) + "\n")
    return db


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted({(r["backend"], r["git_commit"]) for r in records})
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for backend, commit in labels:
        rows = [r for r in records if (r["backend"], r["git_commit"]) == (backend, commit)]
        ttft = sorted((r["prompt_len"], r["ttft_ms"]) for r in rows if r["kind"] == "ttft")
        tpot = sorted(
            (r["prompt_len"], r["tpot_ms"])
            for r in rows
            if r["kind"] == "decode" and r["batch"] == 1 and "tpot_ms" in r
        )
        style = dict(marker="o", label=f"{backend} ({commit})", color=colors[(backend, commit)])
        if ttft:
            ax_ttft.plot(*zip(*ttft), **style)
        if tpot:
            ax_tpot.plot(*zip(*tpot), **style)
    device = records[0]["device"] if records else ""
    ax_ttft.set(
        xscale="log",
        yscale="log",
        xlabel="prompt tokens",
        ylabel="TTFT (ms)",
        title=f"TTFT, batch 1 — {device}",
    )
    ax_tpot.set(
        xscale="log", xlabel="prompt tokens", ylabel="TPOT (ms)", title="decode TPOT, batch 1"
    )
    for ax in (ax_ttft, ax_tpot):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--db", default="docs/benchmarks.json")
    parser.add_argument("--plot", default="docs/ttft_tpot.png")
    args = parser.parse_args()
    records = [r for path in args.results for r in json.loads(Path(path).read_text())]
    merge(Path(args.db), records)
    plot(records, Path(args.plot))


if __name__ == "__main__":
    main()
