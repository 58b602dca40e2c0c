"""The `corematching` command.

    corematching                                  demo: both bundled models (easy-vqa, scenes), dense vs CoreMatching
    corematching --image cat.png --question "What animal is this?" [--model ID_OR_PATH]
    corematching eval --method corematching --budget 0.25 --output runs/cm.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import layout, method_spec
from .errors import UnsupportedModelError
from .method_spec import add_method_arguments, parse_budget, parse_layers  # noqa: F401  (the CLI's names)
from .models import adapter_for

# the method options and building live in the library (method_spec); kept here under their old names
build_method = method_spec.from_args


# ----------------------------------------------------------------------------- run / demo


def demo_items(count: int):
    """Fixed demo questions: the first questions of the first test images, two per image."""
    from .zoo import data

    grouped = data.by_image(data.questions("test"))
    items = []
    for image_id in sorted(grouped)[: (count + 1) // 2]:
        items.extend(grouped[image_id][:2])
    return items[:count]


DEMO_MODELS = ("evqa-smollm2", "scenes-smollm2")


def demo_jobs(model_name: str, count: int) -> list[tuple]:
    """(name, image, question, truth) of the demo of a bundled model: fixed questions of its evaluation data."""
    from PIL import Image

    if model_name == "scenes-smollm2":
        from .zoo import scenes

        return [(f"scene-{k}", item.image, item.question, item.answer)
                for k, item in enumerate(scenes.sample(count, scenes.EVAL_SEED))]
    from .zoo import data

    paths = data.image_paths("test")
    return [(f"test-{q.image_id}", Image.open(paths[q.image_id]), q.question, q.answer) for q in demo_items(count)]


def run(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from .vqa import check_image

    if (args.image is None) != (args.question is None):
        raise ValueError("--image and --question go together")
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty")
    if args.image is not None:
        path = Path(args.image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        check_image(image)
        runs = [(args.model or DEMO_MODELS[0], [(path.stem, image, args.question, None)])]
    else:  # the demo: every bundled model, or the one named by --model
        models = [args.model] if args.model else list(DEMO_MODELS)
        runs = [(name, demo_jobs(name, args.questions)) for name in models]
    method = build_method(args)
    for number, (model_name, jobs) in enumerate(runs):
        if number:
            print()
        answer_jobs(args, method, model_name, jobs, Path(args.out) / model_name if len(runs) > 1 else Path(args.out))
    return 0


def answer_jobs(args: argparse.Namespace, method, model_name: str, jobs: list[tuple], out_dir: Path) -> None:
    """Answer each (name, image, question, truth) dense and under `method`; print a table, save kept-patch pictures."""
    import corematching as cm

    from . import viz
    from .vqa import answer_batch

    print(f"loading {model_name} ...", flush=True)
    model, processor = cm.load_model(model_name, device=args.device)
    adapter = adapter_for(model)  # an unsupported family fails here with a one-line error, before any answer
    print(f"method: {method}", flush=True)
    answer_batch(model, processor, [jobs[0][1]], [jobs[0][2]], None, 2)  # warm-up, not timed
    header = (
        f"{'image':<12} {'question':<48} {'truth':<10} {'dense':<10} {'ms':>6} {'sparse':<10} {'kept':>7} {'ms':>6}"
    )
    print(header)
    print("-" * len(header))
    correct = {"dense": 0, "sparse": 0}
    for number, (name, image, question, truth) in enumerate(jobs):
        t0 = time.perf_counter()
        dense = answer_batch(model, processor, [image], [question], None, args.max_new_tokens)
        t1 = time.perf_counter()
        sparse = answer_batch(model, processor, [image], [question], method, args.max_new_tokens)
        t2 = time.perf_counter()
        images = layout.prompt_images(model, sparse.inputs, adapter)[0]  # the image's tokens, from the adapter
        positions = torch.cat([im.positions for im in images]) if images else torch.zeros(0, dtype=torch.long)
        kept_positions = positions
        if sparse.record is not None and sparse.record.kept_positions is not None:
            kept_positions = sparse.record.kept_positions[0]
        kept = layout.kept_in(positions, kept_positions)
        if truth is not None:
            correct["dense"] += dense.texts[0] == truth
            correct["sparse"] += sparse.texts[0] == truth
        print(f"{name:<12} {question[:48]:<48} {truth or '':<10} {dense.texts[0][:10]:<10} {1e3 * (t1 - t0):>6.0f} "
              f"{sparse.texts[0][:10]:<10} {len(kept):>3}/{positions.numel():<3} {1e3 * (t2 - t1):>6.0f}")
        layout.place_for_picture(images, *image.size, getattr(processor, "image_processor", None))
        panel = kept_patches_panel(image, images, kept_positions, f"{question[:40]} -> {sparse.texts[0][:12]}")
        if panel is not None:
            viz.save_side_by_side([panel], out_dir / f"{number:02d}-{name}.png")
    if jobs[0][3] is not None:
        print(f"\ncorrect: dense {correct['dense']}/{len(jobs)}, sparse {correct['sparse']}/{len(jobs)}")
    print(f"kept-patch pictures: {out_dir}/")


OVERLAY_SIDE = 384  # pixels of the longer side of a kept-patch picture


def kept_patches_panel(image, images, kept_positions, title: str):
    """The kept patches of the prompt's first image drawn over it, on the largest grid of tokens that shows all of
    the picture the model saw (its only grid, its global view or base view; a centre crop where the processor cut
    one); None when no grid does."""
    from PIL import Image

    from . import viz
    from .vqa import check_image

    views = images[0].views if images else []
    if len(views) == 1:
        seen = [view for view in views if view.region is not None]
    else:
        seen = [view for view in views if view.region == layout.WHOLE]
    if not seen:
        return None
    view = max(seen, key=lambda view: view.grid[0] * view.grid[1])
    picture = check_image(image)
    top, left, bottom, right = view.region
    picture = picture.crop((round(left * picture.width), round(top * picture.height), round(right * picture.width),
                            round(bottom * picture.height)))
    ratio = OVERLAY_SIDE / max(picture.size)
    size = (max(1, round(picture.width * ratio)), max(1, round(picture.height * ratio)))
    picture = picture.resize(size, Image.NEAREST if ratio > 1 else Image.BICUBIC)  # enlarged: pixels stay sharp
    return viz.kept_patches_overlay(picture, layout.kept_in(view.positions, kept_positions), view.grid, scale=1,
                                    title=title)


# ----------------------------------------------------------------------------- eval


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


# ----------------------------------------------------------------------------- entry point


def make_parser(command: str) -> argparse.ArgumentParser:
    if command == "eval":
        parser = argparse.ArgumentParser(prog="corematching eval",
                                         description="Accuracy on an evaluation set (easy-vqa or scenes), resumable.")
        parser.add_argument("--set", default=None,
                            help="easy-vqa: test-2000 (seeded sample) or test (all 9,673); scenes: scenes (the "
                                 "700-question evaluation set), scenes:SEED or scenes:SEED:N (fresh questions); "
                                 "default: scenes for --model scenes-smollm2, test-2000 otherwise")
        parser.add_argument("--limit", type=int, default=0, help="only the first N questions of the set")
        parser.add_argument("--output", required=True, help="JSON-lines file of answers (appended; resumes)")
        parser.add_argument("--batch-size", type=int, default=16)
        default_method = "corematching"
    else:
        parser = argparse.ArgumentParser(prog="corematching", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--image", help="an image file to ask about")
        parser.add_argument("--question", help="the question, in plain words")
        parser.add_argument("--questions", type=int, default=6, help="demo: how many questions per model")
        parser.add_argument("--max-new-tokens", type=int, default=8)
        parser.add_argument("--out", default="out", help="folder for the kept-patch pictures")
        default_method = "corematching"
    if command == "eval":
        parser.add_argument("--model", default="evqa-smollm2",
                            help="evqa-smollm2, scenes-smollm2, a hub id or a local path")
    else:
        parser.add_argument("--model", default=None,
                            help="evqa-smollm2, scenes-smollm2, a hub id or a local path (default: the demo runs "
                                 "both bundled models; a question goes to evqa-smollm2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_method_arguments(parser, default_method)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the HTTP server (corematching.serve): its own arguments and errors
        from .serve.cli import main as serve_main

        return serve_main(argv[1:])
    if not argv or argv[0] == "demo":  # the demo (corematching.demo): its own arguments
        from .demo import main as demo_main

        return demo_main(argv)
    command = argv[0] if argv[:1] in (["eval"], ["bench"], ["plan"]) else "run"
    try:
        if command == "bench":
            from . import bench

            return bench.main(argv[1:])
        if command == "plan":  # what fits in a memory budget (corematching.plan)
            from . import plan

            return plan.main(argv[1:])
        args = make_parser(command).parse_args(argv[1:] if command == "eval" else argv)
        return evaluate(args) if command == "eval" else run(args)
    except (FileNotFoundError, ValueError, TypeError, UnsupportedModelError) as error:
        print(f"corematching: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("corematching: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
