"""Tables and needle heat maps from the harness's rows (docs/accuracy.json).

    python -m benchmarks.accuracy.report [--rows docs/accuracy.json] [--plots docs/accuracy]

Prints a markdown table per (model, device): mean exact match per method and setting,
by context length and overall, and the ratio to full KV (``stock``) — the table
docs/ACCURACY.md carries. With ``--plots`` it also draws one heat map (needle depth x
context length, mean score) per method and setting, the usual needle-in-a-haystack plot
(needs matplotlib: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.accuracy.harness import LABEL_FIELDS, REPO


def label(row: dict) -> str:
    """A method and the settings that distinguish it, e.g. ``fastkv retain 0.1``."""
    settings = row["settings"] or {}
    if row["method"] in ("stock", "disabled"):
        return row["method"]
    # Rows with non-default settings (harness --window/--pooling/--pool-kernel/--tsp-layer)
    # are their own method, not averaged into the default's.
    extra = "".join(f" {f} {settings[f]}" for f in LABEL_FIELDS if f in settings)
    return f"{row['method']} retain {settings.get('retain_rate')}{extra}"


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(rows: list[dict]) -> str:
    """Markdown: one line per method label, mean score per context length and overall."""
    lengths = sorted({r["context_len"] for r in rows})
    by_label: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_label[label(r)][r["context_len"]].append(r["score"])
    overall = {name: mean([s for v in cells.values() for s in v])
               for name, cells in by_label.items()}
    full = overall.get("stock")
    head = ["method", *(f"{n:,} tok" for n in lengths), "mean", "vs full KV"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in sorted(by_label, key=lambda n: (n not in ("stock", "disabled"), n)):
        cells = [f"{mean(by_label[name][n]):.3f}" if by_label[name][n] else "-" for n in lengths]
        ratio = f"{overall[name] / full:.1%}" if full else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall[name]:.3f} | {ratio} |")
    return "\n".join(lines)


def heat_maps(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], label(r))].append(r)
    for (model, name), group in sorted(groups.items()):
        lengths = sorted({r["context_len"] for r in group})
        depths = sorted({r["depth"] for r in group})
        cells: dict[tuple, list[float]] = defaultdict(list)
        for r in group:
            cells[(r["depth"], r["context_len"])].append(r["score"])
        grid = [[mean(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths]
                for d in depths]  # fmt: skip
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n)
                                            for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model}: {name}", fontsize=9)
        fig.colorbar(image, ax=ax, label="exact match")
        fig.tight_layout()
        path = out_dir / f"{model}-{name.replace(' ', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=str(REPO / "docs" / "accuracy.json"))
    p.add_argument("--plots", default=None, help="directory for the heat-map PNGs")
    args = p.parse_args()
    rows = json.loads(Path(args.rows).read_text())
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        runs[(r["model"], r["device"])].append(r)
    for (model, device), group in sorted(runs.items()):
        dates = sorted({r["date"] for r in group})
        tasks = sorted({r["task"] for r in group})
        print(f"### {model} on {device} ({', '.join(dates)}; tasks: {', '.join(tasks)})\n")
        print(table(group) + "\n")
    if args.plots:
        for path in heat_maps(rows, Path(args.plots)):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
