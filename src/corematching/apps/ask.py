"""`corematching --image PATH --question TEXT`: one question, answered dense and under a method, with the timing,
the tokens kept and a picture of the kept patches."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import layout
from ..models import adapter_for
from .method_spec import add_method_arguments, add_model_arguments, from_args

DEFAULT_MODEL = "evqa-smollm2"


def run(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from ..vqa import check_image

    if args.image is None or args.question is None:
        raise ValueError("--image and --question go together (the demo of the bundled models is `corematching demo`)")
    if not args.question.strip():
        raise ValueError("--question is empty")
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    check_image(image)
    jobs = [(path.stem, image, args.question, None)]
    answer_jobs(args, from_args(args), args.model or DEFAULT_MODEL, jobs, Path(args.out))
    return 0


def answer_jobs(args: argparse.Namespace, method, model_name: str, jobs: list[tuple], out_dir: Path) -> None:
    """Answer each (name, image, question, truth) dense and under `method`; print a table, save kept-patch pictures."""
    import corematching as cm

    from ..vqa import answer_batch
    from . import viz

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

    from ..vqa import check_image
    from . import viz

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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corematching", description=CLI_USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="an image file to ask about")
    parser.add_argument("--question", help="the question, in plain words")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", default="out", help="folder for the kept-patch pictures")
    add_model_arguments(parser, DEFAULT_MODEL)
    add_method_arguments(parser, "corematching")
    return parser


def main(argv: list[str]) -> int:
    return run(make_parser().parse_args(argv))


CLI_USAGE = """The `corematching` command.

    corematching [demo]                           demo: both bundled models, dense vs CoreMatching vs random tokens
    corematching --image cat.png --question "What animal is this?" [--model ID_OR_PATH]
    corematching eval --method corematching --budget 0.25 --output runs/cm.jsonl
    corematching bench | plan | serve ...         see `corematching COMMAND --help`
"""
