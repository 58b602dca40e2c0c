"""Training curves of scenes-smollm2: monitor accuracy against alignment steps, the shipped recipe against the
earlier one (whose weights were shipped at commit d2df1e4), and the shipped weights' dense accuracy per question
kind on the evaluation set against the answer prior.

    python studies/scenes_curve.py      # docs/scenes/training.png

Reads the records the training writes beside the weights (`scenes-smollm2.json`, the earlier one from git) and
answers the evaluation set densely with the shipped weights (`evaluate.run_eval`, resumable, into
runs/scenes-curve/dense.jsonl: about a minute here; the file records the weights, so it is never read for others).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = "src/corematching/zoo/weights/scenes-smollm2.json"
EARLIER_COMMIT = "d2df1e4"
DENSE_ANSWERS = ROOT / "runs" / "scenes-curve" / "dense.jsonl"
OUT = ROOT / "docs" / "scenes" / "training.png"


def curve(record: dict) -> tuple[list[int], list[float]]:
    steps = [step for step, _, _ in record["curve"]]
    return steps, [100 * accuracy for _, _, accuracy in record["curve"]]


def dense_per_kind() -> dict[str, tuple[float, float]]:
    """{kind: (dense accuracy %, share of the most common answer %)} on the evaluation set, shipped weights."""
    import corematching as cm
    from corematching.apps import evaluate

    items = evaluate.eval_questions("scenes")
    model, processor = cm.load_model("scenes-smollm2")
    summary = evaluate.run_eval(model, processor, None, items, DENSE_ANSWERS, settings_extra={"set": "scenes"})
    out = {}
    for kind, (accuracy, _) in summary.per_kind.items():
        answers = Counter(item.answer for item in items if item.kind == kind)
        out[kind] = (100 * accuracy, 100 * answers.most_common(1)[0][1] / sum(answers.values()))
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shipped = json.loads((ROOT / RECORD).read_text())
    earlier = json.loads(subprocess.run(["git", "-C", str(ROOT), "show", f"{EARLIER_COMMIT}:{RECORD}"], check=True,
                                        capture_output=True, text=True).stdout)
    kinds = dense_per_kind()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), squeeze=False)
    ax = axes[0][0]
    ax.plot(*curve(shipped), "o-", label="shipped: tower and projector frozen in alignment")
    ax.plot(*curve(earlier), "s--", label=f"earlier ({EARLIER_COMMIT}): tower and projector trained")
    ax.axhline(85, color="gray", lw=1, ls=":", label="dense target (evaluation set)")
    ax.set_xlabel("alignment step (4 scenes, about 34 questions per step)")
    ax.set_ylabel("monitor accuracy, teacher-forced (%)")
    ax.set_title("140 monitor questions (seed 2)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    names = list(kinds)
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], [kinds[k][0] for k in names], 0.4, label="dense, shipped weights")
    ax.bar([p + 0.2 for p in positions], [kinds[k][1] for k in names], 0.4, label="most common answer", alpha=0.6)
    ax.set_xticks(list(positions), names, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("evaluation set sample(700, seed=1), greedy answers")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle("scenes-smollm2 training")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
