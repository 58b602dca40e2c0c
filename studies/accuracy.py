"""Accuracy study on the bundled model: which prune layer and match set, then accuracy and object recall
against visual tokens kept for CoreMatching, RandomTokens and UniformTokens.

    python studies/accuracy.py sweep   # prune layer x match set, on the first 500 questions of test-2000
    python studies/accuracy.py main    # budgets x methods on all of test-2000
    python studies/accuracy.py report  # tables (markdown) and a plot from what has been run
    python studies/accuracy.py plot    # the plot again, from studies/results/accuracy.md alone

Every setting writes its answers to runs/study/<name>.jsonl through the resumable evaluator, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import corematching as cm
from corematching.apps.evaluate import eval_questions, run_eval, summarize

RUNS = Path("runs/study")
RESULTS = Path(__file__).parent / "results"
N_VISUAL = 64
NUM_LAYERS = 30  # SmolLM2-135M
BUDGETS = {"100%": 64, "50%": 32, "25%": 16, "12.5%": 8}
SWEEP_QUESTIONS = 400
SWEEP_BUDGET = 8  # the hardest budget separates the settings most


def sweep_settings() -> dict[str, object]:
    settings = {}
    for layer in (1, 2, 4, 8, 12):
        settings[f"sweep-L{layer}-text"] = cm.CoreMatching(prune_layer=layer, token_budget=SWEEP_BUDGET,
                                                           match="text", neuron_layers=[])
    for match in ("all", "last"):
        for layer in (1, 2, 4):
            settings[f"sweep-L{layer}-{match}"] = cm.CoreMatching(prune_layer=layer, token_budget=SWEEP_BUDGET,
                                                                  match=match, neuron_layers=[])
    return settings


def main_settings(prune_layer: int, match: str) -> dict[str, object]:
    """Budgets x methods. CoreMatching with its default neuron layers (none: see the neuron study), and with
    core-neuron decoding at beta 0.4 on every layer after the prune layer, to show what that costs."""
    settings: dict[str, object] = {"dense": None}
    after_prune = list(range(prune_layer + 1, NUM_LAYERS))
    for label, budget in BUDGETS.items():
        tag = label.rstrip("%")
        if budget < N_VISUAL:  # keeping every token without core-neuron decoding is dense exactly
            settings[f"cm-{tag}"] = cm.CoreMatching(prune_layer=prune_layer, token_budget=budget, match=match)
            settings[f"random-{tag}"] = cm.RandomTokens(prune_layer=prune_layer, token_budget=budget, seed=0)
            settings[f"uniform-{tag}"] = cm.UniformTokens(prune_layer=prune_layer, token_budget=budget)
    settings["cm-adaptive"] = cm.CoreMatching(prune_layer=prune_layer, token_budget=None, match=match)
    for tag, budget in (("100", N_VISUAL), ("25", 16)):
        settings[f"cm-{tag}-neurons"] = cm.CoreMatching(prune_layer=prune_layer, token_budget=budget, match=match,
                                                        beta=0.4, neuron_layers=after_prune)
    return settings


def run_all(settings: dict[str, object], questions, only: set[str] | None) -> None:
    model, processor = cm.load_model("evqa-smollm2")
    for name, method in settings.items():
        if only and name not in only:
            continue
        print(f"== {name}: {method}", flush=True)
        summary = run_eval(model, processor, method, questions, RUNS / f"{name}.jsonl")
        print(f"   accuracy {summary.accuracy:.4f}  kept {summary.mean_kept}  recall {summary.object_recall}")


def table(names: list[str], title: str) -> str:
    lines = [f"### {title}", "", "| setting | method | questions | accuracy | visual tokens kept | object recall |",
             "|---|---|---|---|---|---|"]
    for name in names:
        path = RUNS / f"{name}.jsonl"
        if not path.exists():
            continue
        s = summarize(path)
        kept = f"{s.mean_kept:.1f}" if s.mean_kept is not None else "64"
        recall = f"{s.object_recall:.3f}" if s.object_recall is not None else "1.000"
        method_name = s.settings["method"]
        lines.append(f"| {name} | {method_name} | {s.answered} | {100 * s.accuracy:.2f}% | {kept} | {recall} |")
    return "\n".join(lines) + "\n"


def baselines() -> str:
    """Dense accuracy on the sweep's questions and the majority answer's accuracy on test-2000."""
    from corematching.zoo.data import majority_answer

    items = eval_questions("test-2000")
    majority = majority_answer("train")
    lines = [f"Majority answer ('{majority}', from the train split) on test-2000: "
             f"{100 * sum(q.answer == majority for q in items) / len(items):.2f}%."]
    dense = RUNS / "dense.jsonl"
    if dense.exists():
        rows = [json.loads(line) for line in dense.read_text().splitlines()[1:]]
        first = [r["correct"] for r in rows if r["index"] < SWEEP_QUESTIONS]
        if len(first) == SWEEP_QUESTIONS:
            lines.append(f"Dense on the sweep's {SWEEP_QUESTIONS} questions: {100 * sum(first) / len(first):.2f}%.")
    return "\n".join(lines) + "\n"


def report(prune_layer: int, match: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    sweep = table(list(sweep_settings()), f"Sweep: CoreMatching at {SWEEP_BUDGET}/64 tokens, first "
                                          f"{SWEEP_QUESTIONS} questions of test-2000, no neuron sparsity")
    sweep += "\n" + baselines()
    main = table(list(main_settings(prune_layer, match)), "Accuracy and object recall on test-2000")
    (RESULTS / "accuracy.md").write_text(sweep + "\n" + main)
    print(sweep + "\n" + main)
    plot(points_from_runs(), prune_layer, match)


def points_from_runs() -> dict[str, dict]:
    """{setting: its accuracy, questions answered, mean tokens kept and object recall}, from runs/study."""
    points = {}
    for path in sorted(RUNS.glob("*.jsonl")):
        s = summarize(path)
        points[path.stem] = {"accuracy": s.accuracy, "answered": s.answered, "mean_kept": s.mean_kept,
                             "object_recall": s.object_recall}
    return points


def points_from_table(path: Path) -> dict[str, dict]:
    """The same, read back from the markdown tables `report` wrote (studies/results/accuracy.md)."""
    points = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[3].endswith("%"):
            continue
        name, _, answered, accuracy, kept, recall = cells
        points[name] = {"accuracy": float(accuracy.rstrip("%")) / 100, "answered": int(answered),
                        "mean_kept": float(kept), "object_recall": float(recall)}
    return points


def plot(points: dict[str, dict], prune_layer: int, match: str) -> None:
    """Accuracy (with 95% intervals from the number of questions) and object recall against visual tokens kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from corematching.stats import wilson_interval

    def accuracy_bars(point: dict) -> tuple[float, float, float]:
        low, high = wilson_interval(round(point["accuracy"] * point["answered"]), point["answered"])
        return 100 * point["accuracy"], 100 * (point["accuracy"] - low), 100 * (high - point["accuracy"])

    fig, (ax_acc, ax_rec) = plt.subplots(1, 2, figsize=(10, 4))
    styles = (("cm", "CoreMatching", "o-"), ("random", "RandomTokens", "s--"), ("uniform", "UniformTokens", "^:"))
    for number, (prefix, label, style) in enumerate(styles):
        dodge = 2 ** (0.03 * (number - 1))  # side by side on the log axis, so that the intervals stay apart
        xs, accs, below, above, recalls = [], [], [], [], []
        for tag, budget in BUDGETS.items():
            point = points.get("dense" if budget == N_VISUAL else f"{prefix}-{tag.rstrip('%')}")
            if point:  # keeping every token is dense
                accuracy, low, high = accuracy_bars(point)
                xs.append(budget)
                accs.append(accuracy)
                below.append(low)
                above.append(high)
                recalls.append(point["object_recall"] if point["object_recall"] is not None else 1.0)
        ax_acc.errorbar([dodge * x for x in xs], accs, yerr=[below, above], fmt=style, label=label, capsize=2,
                        elinewidth=0.8)
        ax_rec.plot(xs, recalls, style, label=label)
    if "dense" in points:
        ax_acc.axhline(100 * points["dense"]["accuracy"], color="gray", lw=1, label="dense")
    adaptive = points.get("cm-adaptive")
    if adaptive:
        accuracy, low, high = accuracy_bars(adaptive)
        ax_acc.errorbar([adaptive["mean_kept"]], [accuracy], yerr=[[low], [high]], fmt="k*", ms=12, capsize=2,
                        label="CoreMatching adaptive")
        ax_rec.plot([adaptive["mean_kept"]], [adaptive["object_recall"]], "k*", ms=12)
    for ax in (ax_acc, ax_rec):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(BUDGETS.values()), [str(v) for v in BUDGETS.values()])
        ax.set_xlabel("visual tokens kept (of 64)")
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("easy-vqa accuracy (%)")
    ax_acc.set_title("bars: 95% intervals from the number of questions", fontsize=9)
    ax_rec.set_ylabel("object recall (share of shape patches kept)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"evqa-smollm2, test-2000, prune layer {prune_layer}, match '{match}'")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("sweep", "main", "report", "plot"),
                        help="plot: redraw accuracy.png from studies/results/accuracy.md alone")
    parser.add_argument("--prune-layer", type=int, default=cm.CoreMatching().prune_layer)
    parser.add_argument("--match", default=cm.CoreMatching().match)
    parser.add_argument("--only", nargs="*", help="run only these setting names")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    only = set(args.only) if args.only else None
    if args.stage == "plot":
        plot(points_from_table(RESULTS / "accuracy.md"), args.prune_layer, args.match)
        return
    if args.stage == "sweep":
        run_all(sweep_settings(), eval_questions("test-2000")[:SWEEP_QUESTIONS], only)
    elif args.stage == "main":
        run_all(main_settings(args.prune_layer, args.match), eval_questions("test-2000"), only)
    report(args.prune_layer, args.match)


if __name__ == "__main__":
    main()
