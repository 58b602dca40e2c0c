"""`corematching eval`: accuracy (and object recall) of a method on an evaluation set, resumable, one process or
several under torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path

from .method_spec import add_method_arguments, add_model_arguments
from .method_spec import from_args as build_method


def evaluate(args: argparse.Namespace) -> int:
    import corematching as cm

    from . import distributed
    from .evaluate import default_set, eval_questions, run_eval

    method = build_method(args)
    eval_set = args.set or default_set(args.model)
    items = eval_questions(eval_set)
    if args.limit:
        items = items[: args.limit]
    output = Path(args.output)
    shard = distributed.shard_from_env()  # several processes under torchrun: each answers its share
    device = distributed.start(shard, args.device) if shard.distributed else args.device
    try:
        if shard.is_main:
            print(f"loading {args.model} ...", flush=True)
        model, processor = cm.load_model(args.model, device=device)
        summary = run_eval(model, processor, None if args.method == "dense" else method, items, output,
                           batch_size=args.batch_size, progress=shard.is_main, shard=shard,
                           settings_extra={"set": eval_set})
    finally:
        distributed.stop(shard)
    if not shard.is_main:
        return 0
    kept = f"{summary.mean_kept:.1f}" if summary.mean_kept is not None else "all"
    recall = f"{summary.object_recall:.3f}" if summary.object_recall is not None else "-"
    print("\n| method | settings | questions | accuracy | visual tokens kept | object recall |")
    print("|---|---|---|---|---|---|")
    settings = ", ".join(f"{k}={v}" for k, v in summary.settings.items() if k not in ("method", "questions"))
    method_name = summary.settings["method"]
    print(f"| {method_name} | {settings} | {summary.answered} | {summary.accuracy:.4f} | {kept} | {recall} |")
    if summary.per_kind:
        print("\n| question kind | questions | accuracy |\n|---|---:|---:|")
        for kind, (accuracy, count) in summary.per_kind.items():
            print(f"| {kind} | {count} | {accuracy:.4f} |")
    print(f"answers: {output}" + (" (and its rank files)" if shard.distributed else ""))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corematching eval",
                                     description="Accuracy on an evaluation set (easy-vqa or scenes), resumable.")
    parser.add_argument("--set", default=None,
                        help="easy-vqa: test-2000 (seeded sample) or test (all 9,673); scenes: scenes (the "
                             "700-question evaluation set), scenes:SEED or scenes:SEED:N (fresh questions); "
                             "default: scenes for --model scenes-smollm2, test-2000 otherwise")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions of the set")
    parser.add_argument("--output", required=True, help="JSON-lines file of answers (appended; resumes)")
    parser.add_argument("--batch-size", type=int, default=16)
    add_model_arguments(parser)
    add_method_arguments(parser, "corematching")
    return parser


def main(argv: list[str]) -> int:
    return evaluate(make_parser().parse_args(argv))
