"""The demo (`make demo`, `python -m corematching`, `corematching demo`): what CoreMatching does on the two bundled
models, measured while you watch.

For each bundled model it answers the first `--questions` held-out questions of the model's evaluation set three
times: dense, under CoreMatching and under random tokens at the same token budget (through `evaluate.run_eval`,
the evaluator behind `corematching eval`), and times the prefill of a few of them at batch 1. It prints accuracy
with its 95% interval, the visual tokens kept, the object recall, the prefill speedup, the paired difference
between CoreMatching and random tokens, a few answers, and writes pictures of the kept patches. Every number is
computed by this run: the answers go to a fresh temporary folder, never read from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..stats import paired_difference, wilson_interval

DEMO_MODELS = ("evqa-smollm2", "scenes-smollm2")
# Questions per model: most of the time goes to the scene questions, where methods differ (CoreMatching is about 15
# points above random tokens at 12.5% on all 700: 180 questions resolve that); on easy-vqa every method is within
# noise of dense whatever the number of questions.
DEFAULT_QUESTIONS = {"evqa-smollm2": 60, "scenes-smollm2": 180}
SET_NAMES = {"test-2000": "easy-vqa test-2000", "scenes": "scenes.sample(700, seed=1)"}


def wants_demo(argv: list[str]) -> bool:
    """Whether a command line asks for the demo: nothing at all, or the word `demo` first."""
    return not argv or argv[0] == "demo"


# ----------------------------------------------------------------------------- one model


@dataclass
class MethodResult:
    label: str
    answers: list[dict]  # the rows `run_eval` wrote, in question order
    accuracy: float
    interval: tuple[float, float]
    mean_kept: float | None
    object_recall: float | None
    prefill_s: float  # fastest batch-1 prefill, averaged over the timing prompts

    @property
    def correct(self) -> list[bool]:
        return [row["correct"] for row in self.answers]


def read_answers(path: Path) -> list[dict]:
    """The answer rows of a `run_eval` file (its first line holds the settings), in question order."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]
    return sorted(rows, key=lambda row: row["index"])


def prefill_seconds(model, methods: dict, prompts: list[dict], reps: int) -> dict[str, float]:
    """{label: fastest prefill over `reps` rounds, averaged over the prompts}; the methods take turns in each
    round. CPU time of this process: other work on a shared machine barely changes it, unlike wall-clock time."""
    import corematching as cm

    from .bench import timed_generate

    fastest = {label: [math.inf] * len(prompts) for label in methods}
    for method in methods.values():  # warm-up, not timed
        timed_generate(model, method or cm.Dense(), prompts[0], 1)
    for _ in range(reps):
        for label, method in methods.items():
            for number, inputs in enumerate(prompts):
                times, _ = timed_generate(model, method or cm.Dense(), inputs, 1)
                fastest[label][number] = min(fastest[label][number], times["prefill_cpu"])
    return {label: sum(times) / len(times) for label, times in fastest.items()}


def run_model(model_name: str, args: argparse.Namespace, answers_dir: Path) -> tuple[list[MethodResult], list]:
    """Answer the model's first `args.questions` (or its default number of) evaluation questions dense, under
    CoreMatching and under random tokens; returns the results and the questions."""
    import corematching as cm

    from .bench import timing_prompts
    from .evaluate import default_set, eval_questions, run_eval

    model, processor = cm.load_model(model_name, device=args.device)
    set_name = default_set(model_name)
    items = eval_questions(set_name)[: args.questions or DEFAULT_QUESTIONS[model_name]]
    methods = {
        "dense": None,
        "CoreMatching": cm.CoreMatching(token_budget=args.budget),
        "random tokens": cm.RandomTokens(token_budget=args.budget),
    }
    results = []
    for number, (label, method) in enumerate(methods.items()):
        path = answers_dir / f"{model_name}-{number}.jsonl"
        summary = run_eval(model, processor, method, items, path, batch_size=args.batch_size, progress=True)
        right = round(summary.accuracy * summary.answered)
        results.append(MethodResult(label, read_answers(path), summary.accuracy,
                                    wilson_interval(right, summary.answered), summary.mean_kept,
                                    summary.object_recall, math.nan))
    prompts = timing_prompts(processor, model, items, args.timing_prompts)
    seconds = prefill_seconds(model, methods, prompts, args.timing_reps)
    for result in results:
        result.prefill_s = seconds[result.label]
    return results, items


# ----------------------------------------------------------------------------- printing


def percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def report_table(model_name: str, results: list[MethodResult], n_visual: int, questions: int,
                 set_name: str) -> str:
    dense = results[0]
    lines = [f"{model_name}: the first {questions} questions of {SET_NAMES.get(set_name, set_name)} (held out from "
             f"training), {n_visual} visual tokens per image",
             f"  {'method':<14} {'tokens kept':>11}  {'accuracy':>8}  {'95% interval':<15} {'object recall':>13}  "
             f"{'prefill (CPU time)':>20}"]
    for result in results:
        kept = f"{result.mean_kept:.1f}" if result.mean_kept is not None else f"{n_visual}"
        recall = f"{result.object_recall:.2f}" if result.object_recall is not None else "-"
        low, high = result.interval
        speed = f"{1e3 * result.prefill_s:.0f} ms, {dense.prefill_s / result.prefill_s:.2f}x"
        lines.append(f"  {result.label:<14} {kept + '/' + str(n_visual):>11}  {percent(result.accuracy):>8}  "
                     f"{percent(low) + ' - ' + percent(high):<15} {recall:>13}  {speed:>20}")
    return "\n".join(lines)


def verdict(core: MethodResult, random_tokens: MethodResult) -> str:
    """The paired CoreMatching - random difference and what it allows one to say."""
    mean, low, high = paired_difference(core.correct, random_tokens.correct)
    points = f"{100 * mean:+.1f} points (95% interval {100 * low:+.1f} to {100 * high:+.1f}, same questions)"
    if low > 0:
        reading = "CoreMatching answers more questions right than random tokens at this budget"
    elif high < 0:
        reading = "random tokens answer more questions right than CoreMatching at this budget"
    else:
        reading = f"no difference measurable on {len(core.answers)} questions"
    return f"  CoreMatching - random tokens: {points}: {reading}"


def example_lines(results: list[MethodResult], items: list, count: int) -> list[str]:
    """The first `count` questions (not chosen by outcome) with the truth and each method's answer."""
    lines = [f"  {'question':<46} {'truth':<9} " + " ".join(f"{r.label:<14}" for r in results)]
    for index in range(min(count, len(items))):
        answers = " ".join(f"{r.answers[index]['prediction'][:13]:<14}" for r in results)
        lines.append(f"  {items[index].question[:46]:<46} {items[index].answer:<9} {answers}")
    return lines


def save_pictures(results: list[MethodResult], items: list, grid: tuple[int, int], count: int,
                  out_dir: Path) -> list[Path]:
    """For the first `count` questions: the patches CoreMatching and random tokens kept, side by side, under the
    question and its answer."""
    from . import viz
    from .evaluate import item_image

    paths = []
    for index in range(min(count, len(items))):
        image = item_image(items[index])
        scale = max(1, 256 // image.width)
        panels = [viz.kept_patches_overlay(image, r.answers[index]["kept_patches"], grid, scale=scale,
                                           title=f"{r.label}: {r.answers[index]['prediction'][:14]}")
                  for r in results if "kept_patches" in r.answers[index]]
        path = viz.save_side_by_side(panels, out_dir / f"{index:02d}.png")
        with_question(path, f"{items[index].question} (truth: {items[index].answer})")
        paths.append(path)
    return paths


def with_question(path: Path, question: str) -> None:
    """Write the question above the picture at `path`."""
    from PIL import Image, ImageDraw

    picture = Image.open(path)
    sheet = Image.new("RGB", (picture.width, picture.height + 20), (255, 255, 255))
    ImageDraw.Draw(sheet).text((4, 4), question, fill=(0, 0, 0))
    sheet.paste(picture, (0, 20))
    sheet.save(path)


# ----------------------------------------------------------------------------- entry point


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corematching demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=None,
                        help="held-out questions per model (default: " +
                             ", ".join(f"{n} for {m}" for m, n in DEFAULT_QUESTIONS.items()) + ")")
    parser.add_argument("--budget", type=float, default=0.125,
                        help="share of each image's visual tokens CoreMatching and random tokens keep (default 0.125)")
    parser.add_argument("--models", default=",".join(DEMO_MODELS), help="comma-separated bundled models")
    parser.add_argument("--examples", type=int, default=4, help="example answers and pictures per model")
    parser.add_argument("--timing-prompts", type=int, default=4, help="questions whose prefill is timed")
    parser.add_argument("--timing-reps", type=int, default=3, help="rounds of prefill timing (the fastest counts)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="out/demo", help="folder for the kept-patch pictures")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.questions is not None and args.questions < 2:
        parser.error(f"--questions must be at least 2, got {args.questions}")
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must be a share in (0, 1], got {args.budget}")
    if args.timing_prompts < 1 or args.timing_reps < 1:
        parser.error("--timing-prompts and --timing-reps must be at least 1")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in DEMO_MODELS]
    if unknown or not args.models:
        parser.error(f"--models takes {', '.join(DEMO_MODELS)}, got {', '.join(unknown) or 'none'}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv[1:] if argv[:1] == ["demo"] else argv)
    from .evaluate import default_set

    started = time.perf_counter()
    print(f"Dense against CoreMatching and random tokens, each keeping {percent(args.budget)} of every image's "
          f"visual tokens (CoreMatching's token half only: core-neuron decoding is off by default).", flush=True)
    with tempfile.TemporaryDirectory(prefix="corematching-demo-") as answers:
        for model_name in args.models:
            print(f"\nloading {model_name} ...", flush=True)
            results, items = run_model(model_name, args, Path(answers))
            n_visual = results[1].answers[0]["n_visual"]
            side = math.isqrt(n_visual)
            print()
            print(report_table(model_name, results, n_visual, len(items), default_set(model_name)))
            print(verdict(results[1], results[2]))
            print("\n".join(example_lines(results, items, args.examples)))
            pictures = save_pictures(results, items, (side, side), args.examples, Path(args.out) / model_name)
            if pictures:
                print(f"  kept-patch pictures (CoreMatching | random tokens): {pictures[0].parent}/")
    print(f"\nAccuracy intervals: Wilson, from the number of questions. Prefill: batch 1, this process's CPU time "
          f"(all its threads), the fastest of {args.timing_reps} rounds, mean over {args.timing_prompts} questions. "
          "Whole demo: "
          f"{time.perf_counter() - started:.0f} s. More questions: --questions N (the sets hold 2,000 and 700).")
    return 0
