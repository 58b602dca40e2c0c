"""`corematching bench`: methods side by side on one model, in one process: FLOPs, latency, memory, accuracy.

    corematching bench --methods "dense;corematching;random;uniform" --budgets 0.5,0.25,0.125 \
        --questions 300 --output runs/bench.jsonl

For every method/setting (a spec of `method_spec`; `--budgets` repeats each method that has a token budget
at every budget):
  - analytic FLOPs (`flops.py`) of prefill (vision tower + projector + language model) and of one decode
    token, from the tokens and core neurons the session's record says the method kept on the timing prompts;
  - prefill time, per-token decode time (the median step of a run) and end-to-end time for `--new-tokens`
    tokens (exactly that many: end-of-sequence is suppressed), batch 1, over `--reps` rounds of the timing
    prompts; the methods take turns within each round (the order rotating), after one warm-up run each. The
    records hold the median and the fastest run of each, in wall-clock time and in the process's CPU time; the
    table shows the fastest wall-clock runs (on a shared CPU other processes only ever add time, so the minimum is
    the steadier estimate; with one thread, CPU time is steadier still);
  - peak memory during one pass over the timing prompts: process RSS on CPU (sampled every millisecond, freed
    heap handed back first), `torch.cuda.max_memory_allocated` on CUDA;
  - accuracy and object recall on the first `--questions` questions of the eval set (`evaluate.run_eval`,
    answers in `<output stem>-answers/`, resumable).
One JSON line per method/setting goes to `--output` when its accuracy run is complete; a rerun skips the
settings already there (same model and bench settings), and resumes a partial accuracy run. At the end the
table of every record in the file is printed and the Pareto plot (accuracy against prefill FLOPs) written.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from .. import flops
from ..models import adapter_for
from ..stats import wilson_interval
from . import method_spec

DEFAULT_METHODS = "dense;corematching;random;uniform"


# ---------------------------------------------------------------------------------------------- timing


class StepClock:
    """A logits processor that stamps the time after every forward of `generate`: wall-clock time, and the CPU
    time of this process (which other processes on a shared CPU barely change)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        return scores


def timed_generate(model, method, inputs: dict, new_tokens: int) -> tuple[dict, object]:
    """One generate call of exactly `new_tokens` tokens under `method`: (times in s, the session's record)."""
    from transformers import LogitsProcessorList

    import corematching as cm

    clock = StepClock()
    with cm.sparsify(model, method) as session, torch.no_grad():
        sync(model)
        start, cpu_start = time.perf_counter(), time.process_time()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
        sync(model)
        end, cpu_end = time.perf_counter(), time.process_time()
        record = session.last
    times = {}
    for suffix, stamps, first, last in (("", clock.stamps, start, end), ("_cpu", clock.cpu_stamps, cpu_start, cpu_end)):
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        times["prefill" + suffix] = stamps[0] - first
        times["decode_per_token" + suffix] = statistics.median(steps) if steps else float("nan")
        times["end_to_end" + suffix] = last - first
    return times, record


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so that RSS shows what is live (glibc keeps freed chunks)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(model, method, prompts: list[dict], new_tokens: int) -> dict:
    """Peak memory while generating for every prompt once: {"peak_bytes", "above_model_bytes", "kind"}."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)
        before = torch.cuda.memory_allocated(model.device)
        for inputs in prompts:
            timed_generate(model, method, inputs, new_tokens)
        peak = torch.cuda.max_memory_allocated(model.device)
        return {"kind": "cuda_max_memory_allocated", "peak_bytes": peak, "above_model_bytes": peak - before}

    def work():
        for inputs in prompts:
            timed_generate(model, method, inputs, new_tokens)

    before, peak = peak_rss_during(work)
    return {"kind": "rss", "peak_bytes": peak, "above_model_bytes": peak - before}


def peak_rss_during(work) -> tuple[int, int]:
    """(RSS before, peak RSS while `work()` runs), sampled every millisecond after freed memory is handed back."""
    release_free_memory()
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return before, peak[0]


# ---------------------------------------------------------------------------------------------- records


def file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def read_records(path: Path, config: dict) -> dict[str, dict]:
    """{spec: record} already in `path` for this config; raises when the file was written with another one."""
    if not path.exists():
        return {}
    records = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # torn by an interrupted write: dropped
                path.write_text("".join(line + "\n" for line in lines[:-1]))
                break
            raise ValueError(f"{path}: line {number + 1} is not valid JSON") from None
        if record.get("config") != config:
            raise ValueError(
                f"{path} holds results of other bench settings ({record.get('config')}); use another --output"
            )
        records[record["spec"]] = record
    return records


def timing_prompts(processor, model, items, count: int) -> list[dict]:
    """Batch-1 inputs of the first `count` eval questions."""
    from ..vqa import prompts_for
    from .evaluate import item_image

    prompts = []
    for item in items[:count]:
        image = item_image(item)
        inputs = processor(images=[image], text=prompts_for(processor, [item.question]), return_tensors="pt")
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        prompts.append(dict(inputs))
    return prompts


def measure(model, methods: dict[str, object], prompts: list[dict], reps: int, new_tokens: int,
            progress: bool = True) -> dict[str, dict]:
    """FLOPs, times and memory of every method: {spec: {...}}."""
    from tqdm import tqdm

    from ..runtime import sparsify

    shapes = flops.model_shapes(model)
    measured_vision = {}  # id(prompt) -> its vision FLOPs, counted on a dense pass where shapes cannot tell
    if shapes.vision is None:
        language_model = adapter_for(model).language_model
        measured_vision = {id(inputs): flops.measured_vision_flops(model, inputs, language_model) for inputs in prompts}
    specs = list(methods)
    for spec in specs:  # warm-up (TEAL: its thresholds calibrated on the first timing prompt first)
        with sparsify(model, methods[spec]) as session, torch.no_grad():
            if session.needs_calibration:
                session.calibrate(**prompts[0])
        timed_generate(model, methods[spec], prompts[0], new_tokens)
    times = {spec: [] for spec in specs}
    counts = {spec: [] for spec in specs}
    bar = tqdm(total=reps * len(specs) * len(prompts), desc="timing", unit="run", disable=not progress,
               dynamic_ncols=True)
    for rep in range(reps):
        order = specs[rep % len(specs):] + specs[: rep % len(specs)]  # rotate who goes first
        for spec in order:
            for inputs in prompts:
                gc.collect()
                run_times, record = timed_generate(model, methods[spec], inputs, new_tokens)
                times[spec].append(run_times)
                if rep == 0:
                    vision = measured_vision[id(inputs)] if shapes.vision is None else None
                    counts[spec].append(count_sample(shapes, record, inputs, new_tokens, vision))
                bar.update(1)
    bar.close()
    results = {}
    for spec in specs:
        memory = peak_memory(model, methods[spec], prompts, new_tokens)
        results[spec] = {
            "flops": mean_counts(counts[spec]),
            "times": {key: statistics.median(t[key] for t in times[spec]) for key in times[spec][0]},
            "times_min": {key: min(t[key] for t in times[spec]) for key in times[spec][0]},
            "timed_runs": len(times[spec]),
            "memory": memory,
        }
    return results


def count_sample(shapes, record, inputs: dict, new_tokens: int, vision: float | None = None) -> dict:
    """The sample's FLOPs; vision: the measured vision FLOPs (flops.measured_vision_flops) where the shapes have
    no tower flops.py can read."""
    input_ids = inputs["input_ids"]
    counted = flops.sample_flops(shapes, record, prompt_length=input_ids.shape[1], images=1, new_tokens=new_tokens)
    vision = counted.vision if shapes.vision is not None or vision is None else vision
    visual = int(record.visual_mask[0].sum())
    kept_visual = len(record.kept_visual_positions[0]) if record.prune_layer is not None else visual
    return {
        "prefill": counted.prefill + vision,
        "prefill_language_model": counted.prefill,
        "vision": vision,
        "vision_counted": shapes.vision is not None or vision > 0,  # False: the prefill is the LM only
        "decode_per_token": counted.decode_per_token,
        "prompt_tokens": input_ids.shape[1],
        "visual_tokens": visual,
        "kept_visual_tokens": kept_visual,
        "prune_layer": record.prune_layer,
        "mean_decode_ffn_width": statistics.mean(
            width if width is not None else shapes.layers[layer].ffn_width
            for layer, width in enumerate(counted.decode_widths)
        ),
    }


def mean_counts(counts: list[dict]) -> dict:
    fixed = ("prune_layer", "vision_counted")
    out = {key: statistics.mean(c[key] for c in counts) for key in counts[0] if key not in fixed}
    out.update({key: counts[0][key] for key in fixed})
    return out


# ---------------------------------------------------------------------------------------------- report


def table(records: list[dict], timing: str = "times_min", clock: str = "") -> str:
    """Markdown table of the records; times are the fastest runs ("times_min", steadier on a shared CPU) or the
    medians ("times"), of wall-clock time (clock "") or of the process's CPU time (clock "_cpu")."""
    dense = next((r for r in records if r["method"] == "Dense"), None)
    lines = [
        "| method | visual tokens kept | accuracy | object recall | prefill GFLOPs | decode MFLOPs/token "
        "| prefill ms | decode ms/token | end-to-end ms | peak memory MiB | prefill speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        f, chosen = r["flops"], r.get(timing, r["times"])
        t = {key: chosen.get(key + clock, float("nan")) for key in ("prefill", "decode_per_token", "end_to_end")}
        recall = f"{r['object_recall']:.3f}" if r.get("object_recall") is not None else "-"
        accuracy = f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-"
        dense_prefill = dense.get(timing, dense["times"]).get("prefill" + clock, float("nan")) if dense else None
        speedup = f"{dense_prefill / t['prefill']:.2f}x" if dense else "-"
        lines.append(
            f"| {r['label']} | {f['kept_visual_tokens']:.1f}/{f['visual_tokens']:.0f} | {accuracy} | {recall} "
            f"| {f['prefill'] / 1e9:.3f}{'' if f.get('vision_counted', True) else ' (LM only)'} "
            f"| {f['decode_per_token'] / 1e6:.1f} | {1e3 * t['prefill']:.0f} "
            f"| {1e3 * t['decode_per_token']:.1f} | {1e3 * t['end_to_end']:.0f} "
            f"| {r['memory']['peak_bytes'] / 2**20:.0f} | {speedup} |"
        )
    return "\n".join(lines)


def interval_points(record: dict) -> tuple[float, float, float]:
    """(accuracy, low, high) in percent: the 95% (Wilson) interval from the number of questions a record answered."""
    answered = record["answered"]
    low, high = wilson_interval(round(record["accuracy"] * answered), answered)
    return 100 * record["accuracy"], 100 * low, 100 * high


def intervals_overlap(first: dict, second: dict) -> bool:
    """Whether the 95% intervals of two records' accuracies overlap."""
    _, low_a, high_a = interval_points(first)
    _, low_b, high_b = interval_points(second)
    return low_a <= high_b and low_b <= high_a


def plot(records: list[dict], path: Path, title: str, outlier_points: float = 15.0) -> None:
    """Accuracy against prefill FLOPs: one line per method through its settings, each point with its 95% interval
    and dense's interval as a band (no Pareto front: where intervals overlap, no order is measured). Settings more
    than `outlier_points` below the best accuracy are listed in a note instead of stretching the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r.get("accuracy") is not None and r.get("answered")]
    if not records:
        return
    best = max(100 * r["accuracy"] for r in records)
    shown = [r for r in records if 100 * r["accuracy"] >= best - outlier_points]
    hidden = [r for r in records if r not in shown]
    methods = list(dict.fromkeys(r["method"] for r in shown))
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for k, name in enumerate(methods):
        mine = sorted((r for r in shown if r["method"] == name), key=lambda r: r["flops"]["prefill"])
        dodge = 1 + 0.005 * (k - (len(methods) - 1) / 2)  # side by side, so that equal-FLOP intervals stay apart
        xs = [dodge * r["flops"]["prefill"] / 1e9 for r in mine]
        points = [interval_points(r) for r in mine]
        # the interval is from the answered count; an accuracy over fewer scored answers may sit just outside it
        below, above = [max(0.0, y - lo) for y, lo, _ in points], [max(0.0, hi - y) for y, _, hi in points]
        ax.errorbar(xs, [y for y, _, _ in points], yerr=[below, above], marker=markers[k % len(markers)], ms=6, lw=1,
                    capsize=2, elinewidth=0.8, color=plt.cm.tab10(k % 10), label=name, zorder=3)
    dense = next((r for r in shown if r["method"] == "Dense"), None)
    if dense:
        _, low, high = interval_points(dense)
        ax.axhspan(low, high, color="0.85", zorder=0, label="dense: 95% interval")
    if hidden:
        note = "not shown: " + "; ".join(f"{r['label']} {100 * r['accuracy']:.1f}% at "
                                         f"{r['flops']['prefill'] / 1e9:.1f} GFLOPs" for r in hidden)
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.35", va="bottom")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("prefill GFLOPs per question (vision + language model, analytic)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corematching bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    method_spec.add_model_arguments(parser)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="';'-separated method specs, e.g. \"dense;corematching:token_budget=0.25;"
                             "mypkg.mod:MyMethod\"")
    parser.add_argument("--budgets", default="",
                        help="comma-separated token budgets applied to every method with a token_budget field "
                             "not given in its spec, e.g. 0.5,0.25,0.125")
    parser.add_argument("--set", default=None,
                        help="eval set (see `corematching eval`; default: scenes for scenes-smollm2, else test-2000)")
    parser.add_argument("--questions", type=int, default=300, help="accuracy on the first N questions (0: skip)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the accuracy runs")
    parser.add_argument("--timing-prompts", type=int, default=4, help="questions timed, batch 1")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds over the timing prompts")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated in the timed runs")
    parser.add_argument("--output", required=True, help="JSON-lines file of records (appended; resumes)")
    parser.add_argument("--plot", default=None, help="Pareto plot PNG (default: the output with .png)")
    parser.add_argument("--answers", default=None,
                        help="folder of the accuracy runs' answer files (default: <output stem>-answers); "
                             "complete runs found there are reused, partial ones resumed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_budgets(text: str) -> list:
    budgets = [method_spec.parse_budget(part.strip()) for part in text.split(",") if part.strip()]
    return budgets


def main(argv: list[str]) -> int:
    import corematching as cm

    from .evaluate import default_set, eval_questions, run_eval

    args = make_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = method_spec.expand(args.methods, parse_budgets(args.budgets))
    if len(set(specs)) != len(specs):
        raise ValueError(f"a method spec is given twice: {specs}")
    methods = {spec: method_spec.build(spec) for spec in specs}
    for name, value in (("--reps", args.reps), ("--timing-prompts", args.timing_prompts),
                        ("--new-tokens", args.new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    output = Path(args.output)
    plot_path = Path(args.plot) if args.plot else output.with_suffix(".png")
    eval_set = args.set or default_set(args.model)
    items = eval_questions(eval_set)
    config = {
        "model": args.model,
        "set": eval_set,
        "questions": min(args.questions, len(items)),
        "timing_prompts": args.timing_prompts,
        "reps": args.reps,
        "new_tokens": args.new_tokens,
    }
    done = read_records(output, config)
    pending = {spec: method for spec, method in methods.items() if spec not in done}
    progress = not args.no_progress
    if pending:
        print(f"loading {args.model} ...", flush=True)
        model, processor = cm.load_model(args.model, device=args.device)
        prompts = timing_prompts(processor, model, items, args.timing_prompts)
        config_note = f"{torch.get_num_threads()} threads, {model.device}, {model.dtype}"
        print(f"measuring {len(pending)} settings ({len(done)} already in {output}); {config_note}", flush=True)
        started = time.perf_counter()
        measured = measure(model, pending, prompts, args.reps, args.new_tokens, progress)
        answers_dir = Path(args.answers) if args.answers else output.with_name(output.stem + "-answers")
        output.parent.mkdir(parents=True, exist_ok=True)
        for spec, method in pending.items():
            summary = None
            if config["questions"]:
                summary = run_eval(model, processor, method, items[: config["questions"]],
                                   answers_dir / f"{file_label(spec)}.jsonl", batch_size=args.batch_size,
                                   progress=progress, settings_extra={"set": eval_set})
            record = {
                "spec": spec,
                "label": method_spec.describe(method, measured[spec]["flops"]["kept_visual_tokens"]
                                              / max(1, measured[spec]["flops"]["visual_tokens"])),
                "method": type(method).__name__,
                "settings": dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {},
                "config": config,
                **measured[spec],
                "accuracy": summary.accuracy if summary else None,
                "object_recall": summary.object_recall if summary else None,
                "accuracy_per_kind": summary.per_kind if summary else None,  # scene questions: {kind: (acc, n)}
                "answered": summary.answered if summary else 0,
                "environment": {"device": str(model.device), "dtype": str(model.dtype),
                                "threads": torch.get_num_threads(), "torch": torch.__version__},
            }
            with output.open("a") as sink:
                sink.write(json.dumps(record) + "\n")
        print(f"measured in {time.perf_counter() - started:.0f} s", flush=True)
    records = list(read_records(output, config).values())
    order = {spec: k for k, spec in enumerate(specs)}
    records.sort(key=lambda r: order.get(r["spec"], len(order)))
    print()
    print(table(records))
    if all("prefill_cpu" in r["times"] for r in records):
        print("\nthe same, times as this process's CPU time (all its threads):\n")
        print(table(records, clock="_cpu"))
    plot(records, plot_path, f"{args.model}, {config['set']} first {config['questions']} questions")
    print(f"\nrecords: {output}\nPareto plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
