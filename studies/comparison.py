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

from corematching.apps.bench import intervals_overlap
from corematching.apps.bench import plot as bench_plot

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "comparison" / "accuracy-flops.jsonl"
FIGURE = ROOT / "docs" / "comparison" / "pareto.png"
OUTLIER_POINTS = 15.0  # settings this far below the best accuracy are named in a note instead of stretching the axis


def read_records(path: Path) -> list[dict]:
    """The bench records of `path` that hold an accuracy run."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("accuracy") is not None and r.get("answered")]


def plot(records: list[dict], path: Path) -> None:
    """bench's plot, titled with what the intervals say."""
    best = max(100 * r["accuracy"] for r in records)
    shown = [r for r in records if 100 * r["accuracy"] >= best - OUTLIER_POINTS]
    dense = next((r for r in shown if r["method"] == "Dense"), None)
    reading = ("every interval overlaps dense's: these questions do not separate the methods\n(the scene questions "
               "do: docs/results-scenes.md)" if dense and all(intervals_overlap(r, dense) for r in shown) else
               "where intervals overlap, the difference is not measurable on these questions")
    questions = sorted({r["answered"] for r in shown})
    config = shown[0]["config"]
    title = (f"{config['model']}, the first {'/'.join(map(str, questions))} questions of {config['set']}: "
             f"bars are 95% intervals from the number of questions.\n{reading}")
    bench_plot(records, path, title, OUTLIER_POINTS)


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
