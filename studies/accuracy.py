"""Accuracy study on the bundled model: which prune layer and match set, then accuracy and object recall
against visual tokens kept for CoreMatching, RandomTokens and UniformTokens.

    python studies/accuracy.py sweep   # prune layer x match set, on the first 500 questions of test-2000
    python studies/accuracy.py main    # budgets x methods on all of test-2000
    python studies/accuracy.py report  # tables (markdown) and a plot from what has been run

Every setting writes its answers to runs/study/<name>.jsonl through the resumable evaluator, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import corematching as cm
from corematching.evaluate import eval_questions, run_eval, summarize

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
    plot(prune_layer, match)


def plot(prune_layer: int, match: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rec) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, label, style in (("cm", "CoreMatching", "o-"), ("random", "RandomTokens", "s--"),
                                 ("uniform", "UniformTokens", "^:")):
        xs, accs, recalls = [], [], []
        for tag, budget in BUDGETS.items():
            path = RUNS / f"{prefix}-{tag.rstrip('%')}.jsonl"
            if budget == N_VISUAL:
                path = RUNS / "dense.jsonl"  # keeping every token is dense
            if path.exists():
                s = summarize(path)
                xs.append(budget)
                accs.append(100 * s.accuracy)
                recalls.append(s.object_recall if s.object_recall is not None else 1.0)
        ax_acc.plot(xs, accs, style, label=label)
        ax_rec.plot(xs, recalls, style, label=label)
    dense = RUNS / "dense.jsonl"
    if dense.exists():
        ax_acc.axhline(100 * summarize(dense).accuracy, color="gray", lw=1, label="dense")
    adaptive = RUNS / "cm-adaptive.jsonl"
    if adaptive.exists():
        s = summarize(adaptive)
        ax_acc.plot([s.mean_kept], [100 * s.accuracy], "k*", ms=12, label="CoreMatching adaptive")
        ax_rec.plot([s.mean_kept], [s.object_recall], "k*", ms=12)
    for ax in (ax_acc, ax_rec):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(BUDGETS.values()), [str(v) for v in BUDGETS.values()])
        ax.set_xlabel("visual tokens kept (of 64)")
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("easy-vqa accuracy (%)")
    ax_rec.set_ylabel("object recall (share of shape patches kept)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"evqa-smollm2, test-2000, prune layer {prune_layer}, match '{match}'")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("sweep", "main", "report"))
    parser.add_argument("--prune-layer", type=int, default=cm.CoreMatching().prune_layer)
    parser.add_argument("--match", default=cm.CoreMatching().match)
    parser.add_argument("--only", nargs="*", help="run only these setting names")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    only = set(args.only) if args.only else None
    if args.stage == "sweep":
        run_all(sweep_settings(), eval_questions("test-2000")[:SWEEP_QUESTIONS], only)
    elif args.stage == "main":
        run_all(main_settings(args.prune_layer, args.match), eval_questions("test-2000"), only)
    report(args.prune_layer, args.match)


if __name__ == "__main__":
    main()
