"""Accuracy of `scenes-smollm2` on scene questions, per question kind, resumable, with recall of the queried objects.

    python -m corematching.zoo.scenes_eval --output runs/scenes-eval/dense.jsonl            # the evaluation set
    # fresh questions:
    python -m corematching.zoo.scenes_eval --question-seed 7 --n 500 --output runs/scenes-eval/fresh.jsonl
    python -m corematching.zoo.scenes_eval --method corematching --budget 0.25 --output runs/scenes-eval/cm25.jsonl

Every answer is appended to the JSON-lines output as soon as it is produced; rerunning the same command resumes
(the settings on the file's first line must match). The summary gives the accuracy per kind and, under a
pruning method, the share of the queried objects' patches that were kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..evaluate import (
    PATCH_COVER,
    covered_patches,
    kept_patch_indices,
    method_settings,
    read_results,
    weights_setting,
)
from ..vqa import answer_batch
from . import scenes

MODEL = "scenes-smollm2"


def queried_patches(mask: np.ndarray, grid: int, min_cover: float = PATCH_COVER) -> torch.Tensor:
    """Bool [grid * grid] (row-major): patches at least `min_cover` covered by the queried objects' pixels (the
    same rule as easy-vqa's object recall)."""
    return covered_patches(mask, (grid, grid), min_cover)


def run(model, processor, method, items: list[scenes.Item], output: Path, settings_extra: dict,
        batch_size: int = 16, progress: bool = True) -> dict:
    from tqdm import tqdm

    settings = {**method_settings(method), **weights_setting(model), **settings_extra, "questions": len(items)}
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {row["index"] for row in read_results(output, settings)}
    if not output.exists() or output.stat().st_size == 0:
        output.write_text(json.dumps({"settings": settings}) + "\n")
    todo = [k for k in range(len(items)) if k not in done]
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress, unit="q", dynamic_ncols=True)
    with output.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers, record, input_ids = answer_batch(
                model, processor, [items[k].image for k in chunk], [items[k].question for k in chunk], method
            )
            for row, k in enumerate(chunk):
                item = items[k]
                result = {"index": k, "kind": item.kind, "question": item.question, "answer": item.answer,
                          "prediction": answers[row], "correct": answers[row] == item.answer}
                if record is not None and getattr(record, "kept_positions", None) is not None:
                    kept = kept_patch_indices(input_ids[row], record.kept_positions[row], model.config.image_token_id)
                    queried = queried_patches(item.mask, grid)
                    result["kept_patches"] = kept
                    if queried.any():
                        result["queried_recall"] = queried[kept].sum().item() / queried.sum().item()
                sink.write(json.dumps(result) + "\n")
            sink.flush()
            bar.update(len(chunk))
    bar.close()
    return summarize(output)


def summarize(output: Path) -> dict:
    """{"settings", "answered", "accuracy", "per_kind": {kind: (accuracy, count)}, "queried_recall", "mean_kept"}."""
    rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    header, answers = rows[0]["settings"], rows[1:]
    per_kind = {}
    for kind in scenes.KINDS:
        of_kind = [r["correct"] for r in answers if r["kind"] == kind]
        if of_kind:
            per_kind[kind] = (sum(of_kind) / len(of_kind), len(of_kind))
    recall = [r["queried_recall"] for r in answers if "queried_recall" in r]
    kept = [len(r["kept_patches"]) for r in answers if "kept_patches" in r]
    return {
        "settings": header,
        "answered": len(answers),
        "accuracy": sum(r["correct"] for r in answers) / max(1, len(answers)),
        "per_kind": per_kind,
        "queried_recall": sum(recall) / len(recall) if recall else None,
        "mean_kept": sum(kept) / len(kept) if kept else None,
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
    from .. import cli
    from . import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question-seed", type=int, default=scenes.EVAL_SEED,
                        help=f"question seed (default {scenes.EVAL_SEED}: the evaluation set)")
    parser.add_argument("--n", type=int, default=scenes.EVAL_SIZE, help="number of questions")
    parser.add_argument("--output", type=Path, required=True, help="JSON-lines file (resumed if it exists)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    cli.add_method_arguments(parser, default_method="dense")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        method = cli.build_method(args)
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
