"""Accuracy against prefill FLOPs of the easy-vqa comparison, with each point's 95% interval, from the stored
`corematching bench` records (no model runs).

    python studies/comparison.py    # docs/comparison/accuracy-flops.jsonl -> docs/comparison/pareto.png

On easy-vqa at 200 questions one accuracy's 95% interval is about +-4.5 points, wider than every difference
between the token methods, so the plot draws no Pareto front: the scene questions are where methods differ
(`python studies/scenes.py plots`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corematching.stats import wilson_interval

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "comparison" / "accuracy-flops.jsonl"
FIGURE = ROOT / "docs" / "comparison" / "pareto.png"
OUTLIER_POINTS = 15.0  # settings this far below the best accuracy are named in a note instead of stretching the axis


def read_records(path: Path) -> list[dict]:
    """The bench records of `path` that hold an accuracy run."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("accuracy") is not None and r.get("answered")]


def interval_points(record: dict) -> tuple[float, float, float]:
    """(accuracy, low, high) in percent: the 95% interval from the number of questions the record answered."""
    answered = record["answered"]
    low, high = wilson_interval(round(record["accuracy"] * answered), answered)
    return 100 * record["accuracy"], 100 * low, 100 * high


def overlaps(first: dict, second: dict) -> bool:
    """Whether the 95% intervals of two records' accuracies overlap."""
    _, low_a, high_a = interval_points(first)
    _, low_b, high_b = interval_points(second)
    return low_a <= high_b and low_b <= high_a


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = max(100 * r["accuracy"] for r in records)
    shown = [r for r in records if 100 * r["accuracy"] >= best - OUTLIER_POINTS]
    hidden = [r for r in records if r not in shown]
    methods = list(dict.fromkeys(r["method"] for r in shown))
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for k, name in enumerate(methods):
        mine = sorted((r for r in shown if r["method"] == name), key=lambda r: r["flops"]["prefill"])
        dodge = 1 + 0.005 * (k - (len(methods) - 1) / 2)  # side by side, so that equal-FLOP intervals stay apart
        xs = [dodge * r["flops"]["prefill"] / 1e9 for r in mine]
        points = [interval_points(r) for r in mine]
        below, above = [y - lo for y, lo, _ in points], [hi - y for y, _, hi in points]
        ax.errorbar(xs, [y for y, _, _ in points], yerr=[below, above],
                    marker=markers[k % len(markers)], ms=6, lw=1, capsize=2, elinewidth=0.8,
                    color=plt.cm.tab10(k % 10), label=name, zorder=3)
    dense = next((r for r in shown if r["method"] == "Dense"), None)
    if dense:
        _, low, high = interval_points(dense)
        ax.axhspan(low, high, color="0.85", zorder=0, label="dense: 95% interval")
    if hidden:
        note = "not shown: " + "; ".join(f"{r['label']} {100 * r['accuracy']:.1f}% at "
                                         f"{r['flops']['prefill'] / 1e9:.1f} GFLOPs" for r in hidden)
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.35", va="bottom")
    questions = sorted({r["answered"] for r in shown})
    config = shown[0]["config"]
    reading = ("every interval overlaps dense's: these questions do not separate the methods\n(the scene questions "
               "do: docs/results-scenes.md)" if dense and all(overlaps(r, dense) for r in shown) else
               "where intervals overlap, the difference is not measurable on these questions")
    ax.set_title(f"{config['model']}, the first {'/'.join(map(str, questions))} questions of {config['set']}: "
                 f"bars are 95% intervals from the number of questions.\n{reading}", fontsize=9)
    ax.set_xlabel("prefill GFLOPs per question (vision + language model, analytic)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--output", type=Path, default=FIGURE)
    args = parser.parse_args()
    records = read_records(args.records)
    if not records:
        raise SystemExit(f"no bench record with an accuracy run in {args.records}")
    plot(records, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
