"""Accuracy of `scenes-smollm2` on scene questions, per question kind, resumable, with recall of the queried objects.

    python -m corematching.apps.scenes_eval --output runs/scenes-eval/dense.jsonl            # the evaluation set
    # fresh questions:
    python -m corematching.apps.scenes_eval --question-seed 7 --n 500 --output runs/scenes-eval/fresh.jsonl
    python -m corematching.apps.scenes_eval --method corematching --budget 0.25 --output runs/scenes-eval/cm25.jsonl

Every answer is appended to the JSON-lines output as soon as it is produced; rerunning the same command resumes
(the settings on the file's first line must match). The summary gives the accuracy per kind and, under a
pruning method, the share of the queried objects' patches that were kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..zoo import scenes
from . import evaluate

MODEL = "scenes-smollm2"


def queried_patches(mask: np.ndarray, grid: int, min_cover: float = evaluate.PATCH_COVER) -> torch.Tensor:
    """Bool [grid * grid] (row-major): patches at least `min_cover` covered by the queried objects' pixels (the
    same rule as easy-vqa's object recall)."""
    return evaluate.covered_patches(mask, (grid, grid), min_cover)


def run(model, processor, method, items: list[scenes.Item], output: Path, settings_extra: dict,
        batch_size: int = 16, progress: bool = True) -> dict:
    """`evaluate.run_eval` on scene items; returns `summarize(output)`."""
    evaluate.run_eval(model, processor, method, items, output, batch_size=batch_size, progress=progress,
                      settings_extra=settings_extra)
    return summarize(output)


def summarize(output: Path) -> dict:
    """{"settings", "answered", "accuracy", "per_kind": {kind: (accuracy, count)} in the order of scenes.KINDS,
    "queried_recall" (the object recall of the queried objects), "mean_kept"}."""
    summary = evaluate.summarize(output)
    per_kind = summary.per_kind or {}
    return {
        "settings": summary.settings,
        "answered": summary.answered,
        "accuracy": summary.accuracy,
        "per_kind": {kind: per_kind[kind] for kind in scenes.KINDS if kind in per_kind},
        "queried_recall": summary.object_recall,
        "mean_kept": summary.mean_kept,
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['settings']['method']}: {summary['answered']} questions, "
             f"accuracy {100 * summary['accuracy']:.2f}%"]
    if summary["mean_kept"] is not None:
        lines.append(f"mean visual tokens kept {summary['mean_kept']:.1f}, queried-object recall "
                     f"{summary['queried_recall']:.3f}")
    lines.append(f"{'kind':<12} {'accuracy':>9} {'questions':>9}")
    for kind, (accuracy, count) in summary["per_kind"].items():
        lines.append(f"{kind:<12} {100 * accuracy:>8.2f}% {count:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..zoo import load_model
    from . import method_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question-seed", type=int, default=scenes.EVAL_SEED,
                        help=f"question seed (default {scenes.EVAL_SEED}: the evaluation set)")
    parser.add_argument("--n", type=int, default=scenes.EVAL_SIZE, help="number of questions")
    parser.add_argument("--output", type=Path, required=True, help="JSON-lines file (resumed if it exists)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    method_spec.add_method_arguments(parser, default_method="dense")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        method = method_spec.from_args(args)
        items = scenes.sample(args.n, args.question_seed)
        model, processor = load_model(MODEL)
        summary = run(model, processor, None if args.method == "dense" else method, items, args.output,
                      {"model": MODEL, "question_seed": args.question_seed}, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        print(f"scenes_eval: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
