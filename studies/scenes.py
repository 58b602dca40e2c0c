"""Token study on the second bundled model, `scenes-smollm2`: every token method at 50%, 25% and 12.5% of the
visual tokens and at prune layers 0, 1, 2 and 4, with accuracy and the recall of the queried objects' patches.

    python studies/scenes.py run       # one worker; start two side by side to share the settings (resumable)
    python studies/scenes.py report    # tables (studies/results/scenes.md), numbers (scenes.json), plots, pictures
    python studies/scenes.py plots     # the plots again, from studies/results/scenes.json alone

Questions: the first PER_KIND (40) questions of each of the seven kinds of the evaluation set `scenes.sample(700,
seed=1)` (in the set's order) at the main prune layer and before the language model, the first PER_KIND_LAYERS
(20) of each kind at the other prune layers, and for the fresh-seed check the first PER_KIND of each kind of
`scenes.sample(FRESH_POOL, seed=11)`. The model is scenes-smollm2 with the weights of WEIGHTS_COMMIT, read from
git. Answers are greedy and scored by exact match through the evaluator of `corematching.apps.scenes_eval` (one
JSON-lines file per setting in runs/scenes-study-<weights commit>/, resumed where it stopped).
Workers claim settings through lock files, so two of them never run the same setting.

Queried-object recall: a patch of the 8x8 grid (16x16 pixels) covers the queried objects when at least
MIN_COVER of its pixels are in the item's mask; recall is the share of those patches whose visual token the
method kept (`session.last.kept_positions`, mapped to grid positions in order), averaged over the questions with
at least one such patch (a "no" to `exists` about absent objects and a count of an absent shape have none).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import subprocess
import time
from pathlib import Path

import torch

import corematching as cm
from corematching.apps.scenes_eval import queried_patches
from corematching.apps.scenes_eval import run as eval_run
from corematching.zoo import scenes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "studies" / "results"
DOCS = ROOT / "docs" / "scenes"
MODEL = "scenes-smollm2"
N_VISUAL = 64
GRID = 8
PER_KIND = 40  # questions per kind at the main layer, before the LM and in the fresh check: 7 x 40 = 280
PER_KIND_LAYERS = 20  # questions per kind at the other prune layers (the first 20 of the 40): 7 x 20 = 140
EVAL_SEED, EVAL_POOL = scenes.EVAL_SEED, scenes.EVAL_SIZE
FRESH_SEED, FRESH_POOL = 11, 600
MIN_COVER = 0.25  # a patch covers the queried objects when this share of its pixels is in the mask
LAYERS = (0, 1, 2, 4)
MAIN_LAYER = 1  # CoreMatching's default prune layer
BUDGETS = {"50": 32, "25": 16, "12.5": 8}
VISIONZIP = {"50": (27, 5), "25": (13, 3), "12.5": (7, 1)}  # dominant + contextual, the paper's 54 : 10
# PDrop: two stages, after K and K + 4, whose product of ratios lands exactly on the budget through ceil:
# 64 -> 48 -> 32, 64 -> 32 -> 16, 64 -> 24 -> 8
PDROP = {"50": (0.75, 2 / 3), "25": (0.5, 0.5), "12.5": (0.375, 1 / 3)}
FRESH_BUDGETS = ("25", "12.5")
NAMES = {"cm": "CoreMatching", "random": "RandomTokens", "uniform": "UniformTokens", "fastv": "FastV",
         "dart": "DART", "divprune": "DivPrune", "cdpruner": "CDPruner", "pdrop": "PDrop", "visionzip": "VisionZip"}
LAYERED = ("cm", "random", "uniform", "fastv", "dart", "divprune", "cdpruner", "pdrop")
# The shipped weights (README: 61.14% dense on the evaluation set), read from git so that a retraining in the
# working tree cannot change the model under a run; every run file records them, and the run folder is named after
# them. The earlier weights' study (commit d2df1e4, 51.29% dense) is kept in studies/results/scenes-d2df1e4.*.
WEIGHTS_COMMIT = "6b6885b56b7539697ed74af1807bbbe4d84e7a96"
WEIGHTS_PATH = "src/corematching/zoo/weights/scenes-smollm2.safetensors"
RUNS = ROOT / "runs" / f"scenes-study-{WEIGHTS_COMMIT[:7]}"
PICTURE_KINDS = ("color", "left_of", "above", "exists")  # the first question of each kind in the study's set


# ----------------------------------------------------------------------------- questions and settings


def balanced(seed: int, pool: int, per_kind: int = PER_KIND) -> list[scenes.Item]:
    """The first `per_kind` items of each kind of sample(pool, seed), in the sample's order."""
    counts = dict.fromkeys(scenes.KINDS, 0)
    items = []
    for item in scenes.sample(pool, seed):
        if counts[item.kind] < per_kind:
            counts[item.kind] += 1
            items.append(item)
    short = {kind: n for kind, n in counts.items() if n < per_kind}
    if short:
        raise ValueError(f"sample({pool}, {seed}) has too few questions of kinds {short}")
    return items


LAYERED_CLASSES = {"random": cm.RandomTokens, "uniform": cm.UniformTokens, "fastv": cm.FastV, "dart": cm.DART,
                   "divprune": cm.DivPrune, "cdpruner": cm.CDPruner}


def layered_method(prefix: str, layer: int, tag: str):
    budget = BUDGETS[tag] if tag != "adaptive" else None
    if prefix == "cm":
        return cm.CoreMatching(prune_layer=layer, token_budget=budget, neuron_layers=[])
    if prefix == "pdrop":
        first, second = PDROP[tag]
        return cm.PDrop(schedule=((layer, first), (layer + 4, second)))
    if prefix in LAYERED_CLASSES:
        return LAYERED_CLASSES[prefix](prune_layer=layer, token_budget=budget)
    raise ValueError(prefix)


def layer_key(layer: int) -> str:
    return "pre" if layer < 0 else f"L{layer}"


def grid_settings() -> dict[str, tuple[str, int, str, object, int]]:
    """{name: (method prefix, layer (-1 = before the language model), budget tag, method, questions per kind)} on
    the evaluation questions, in the order the workers take them: dense, the main layer and the methods that prune
    before the language model, CoreMatching at the other layers (the fresh-seed check picks its layer from these),
    then the other methods at the other layers, PDrop last."""
    settings: dict[str, tuple[str, int, str, object, int]] = {"dense": ("dense", -1, "100", None, PER_KIND)}
    for layer in LAYERS:  # layer 0 ran first, at PER_KIND; its first PER_KIND_LAYERS per kind are read from it
        per_kind = PER_KIND if layer in (0, MAIN_LAYER) else PER_KIND_LAYERS
        if layer in (0, MAIN_LAYER):
            for tag in (*BUDGETS, "adaptive"):
                settings[f"L{layer}-cm-{tag}"] = ("cm", layer, tag, layered_method("cm", layer, tag), per_kind)
    for prefix in LAYERED[1:]:
        for tag in BUDGETS:
            settings[f"L{MAIN_LAYER}-{prefix}-{tag}"] = (prefix, MAIN_LAYER, tag,
                                                         layered_method(prefix, MAIN_LAYER, tag), PER_KIND)
    for tag in BUDGETS:
        dominant, contextual = VISIONZIP[tag]
        settings[f"pre-visionzip-{tag}"] = ("visionzip", -1, tag, cm.VisionZip(dominant, contextual), PER_KIND)
        for prefix in ("divprune", "cdpruner"):  # their own default: before the language model
            settings[f"pre-{prefix}-{tag}"] = (prefix, -1, tag, layered_method(prefix, -1, tag), PER_KIND)
    others = [layer for layer in LAYERS if layer not in (0, MAIN_LAYER)]
    for layer in others:
        for tag in (*BUDGETS, "adaptive"):
            settings[f"L{layer}-cm-{tag}"] = ("cm", layer, tag, layered_method("cm", layer, tag), PER_KIND_LAYERS)
    for prefix in LAYERED[1:]:
        for layer in LAYERS:
            if layer == MAIN_LAYER:
                continue
            for tag in BUDGETS:
                settings[f"L{layer}-{prefix}-{tag}"] = (prefix, layer, tag, layered_method(prefix, layer, tag),
                                                        PER_KIND_LAYERS)
    return settings


FIRST_AFTER_CM = f"L{[x for x in LAYERS if x != MAIN_LAYER][0]}-random-50"  # the fresh check runs before it


def fresh_settings(layers: list[int]) -> dict[str, tuple[str, int, str, object, int]]:
    settings: dict[str, tuple[str, int, str, object, int]] = {"fresh-dense": ("dense", -1, "100", None, PER_KIND)}
    for layer in layers:
        for prefix in ("cm", "random", "uniform"):
            for tag in FRESH_BUDGETS:
                settings[f"fresh-L{layer}-{prefix}-{tag}"] = (prefix, layer, tag, layered_method(prefix, layer, tag),
                                                              PER_KIND)
    return settings


# ----------------------------------------------------------------------------- recall and summaries


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines()[1:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a run in progress
            pass
    return rows


def item_recall(item: scenes.Item, kept: list[int], min_cover: float = MIN_COVER) -> float | None:
    queried = queried_patches(item.mask, GRID, min_cover)
    if not queried.any():
        return None
    return queried[kept].sum().item() / queried.sum().item()


_ITEMS: dict[tuple[int, int], list[scenes.Item]] = {}


def items_of(seed: int, per_kind: int) -> list[scenes.Item]:
    if (seed, per_kind) not in _ITEMS:
        _ITEMS[seed, per_kind] = balanced(seed, EVAL_POOL if seed == EVAL_SEED else FRESH_POOL, per_kind)
    return _ITEMS[seed, per_kind]


def view_indices(per_kind: int, view: int) -> list[int]:
    """Indices, in a run of `per_kind` questions per kind, of the first `view` of each kind."""
    ranks = dict.fromkeys(scenes.KINDS, 0)
    indices = []
    for k, item in enumerate(items_of(EVAL_SEED, per_kind)):
        if ranks[item.kind] < view:
            indices.append(k)
        ranks[item.kind] += 1
    return indices


def object_patches(item: scenes.Item) -> torch.Tensor:
    """Bool [GRID * GRID]: patches showing any pixel of any object of the scene (queried or not)."""
    return queried_patches(item.scene.object_map >= 0, GRID, min_cover=1e-9)


def summarize(path: Path, seed: int = EVAL_SEED, view: int | None = None) -> dict | None:
    """Accuracy and recall of one setting, overall and per kind, on the first `view` questions of each kind
    (default: all of its run's); None while the run is incomplete."""
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return None
    per_kind = json.loads(lines[0])["settings"]["per_kind"]
    all_items = items_of(seed, per_kind)
    rows = {row["index"]: row for row in read_rows(path)}
    if len(rows) < len(all_items):
        return None
    if view is not None and view > per_kind:
        return None
    if view is not None and view < per_kind:
        keep = view_indices(per_kind, view)
        rows = {j: rows[k] for j, k in enumerate(keep)}
        items = [all_items[k] for k in keep]
    else:
        items = all_items
    out = {"questions": len(items), "per_kind": {}}
    groups = {"all": list(range(len(items)))}
    for kind in scenes.KINDS:
        groups[kind] = [k for k, item in enumerate(items) if item.kind == kind]
    for group, indices in groups.items():
        correct = [rows[k]["correct"] for k in indices]
        entry = {"questions": len(indices), "accuracy": sum(correct) / len(correct)}
        if "kept_patches" in rows[indices[0]]:
            for key, cover in (("recall", MIN_COVER), ("recall_cover_0.1", 0.1)):
                values = [item_recall(items[k], rows[k]["kept_patches"], cover) for k in indices]
                values = [v for v in values if v is not None]
                entry[key] = sum(values) / len(values) if values else None
                if cover == MIN_COVER:
                    entry["recall_questions"] = len(values)
            entry["mean_kept"] = sum(len(rows[k]["kept_patches"]) for k in indices) / len(indices)
            # share of the kept patches that show no object at all (plain background)
            entry["kept_background"] = sum(
                1 - object_patches(items[k])[rows[k]["kept_patches"]].float().mean().item() for k in indices
            ) / len(indices)
        else:  # dense keeps every patch
            entry.update({"recall": 1.0, "recall_cover_0.1": 1.0, "mean_kept": float(N_VISUAL),
                          "kept_background": sum(1 - object_patches(items[k]).float().mean().item()
                                                 for k in indices) / len(indices)})
        if group == "all":
            out.update(entry)
        else:
            out["per_kind"][group] = entry
    out["correct"] = [bool(rows[k]["correct"]) for k in range(len(items))]
    return out


def fresh_layers() -> tuple[list[int], int | None, dict]:
    """The layers of the fresh-seed check: the main layer and CoreMatching's best layer by queried-object recall
    (mean over 25% and 12.5%) on the evaluation questions (the first PER_KIND_LAYERS of each kind, which every
    layer ran); only the main layer while the grid's CoreMatching runs are missing."""
    means = {}
    for layer in LAYERS:
        values = [summarize(RUNS / f"L{layer}-cm-{tag}.jsonl", view=PER_KIND_LAYERS) for tag in FRESH_BUDGETS]
        if any(v is None for v in values):
            return [MAIN_LAYER], None, {}
        means[layer] = sum(v["recall"] for v in values) / len(values)
    best = max(LAYERS, key=lambda layer: (means[layer], layer == MAIN_LAYER))
    return sorted({MAIN_LAYER, best}), best, means


# ----------------------------------------------------------------------------- running


def load_pinned():
    """scenes-smollm2 with the weights of WEIGHTS_COMMIT (as cm.load_model builds it from the shipped file)."""
    from safetensors.torch import load as load_safetensors

    from corematching.zoo.build import apply_trained, build_untrained

    blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{WEIGHTS_COMMIT}:{WEIGHTS_PATH}"], check=True,
                          capture_output=True).stdout
    model, processor = build_untrained(name=MODEL)
    apply_trained(model, load_safetensors(blob))
    return model.eval(), processor


def run_worker(only: set[str] | None, batch_size: int) -> None:
    model, processor = load_pinned()
    locks = RUNS / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    timing = RUNS / "timing.jsonl"

    def run_setting(name: str, method, per_kind: int, seed: int) -> None:
        if only and name not in only:
            return
        path = RUNS / f"{name}.jsonl"
        items = items_of(seed, per_kind)
        if len(read_rows(path)) >= len(items):
            return
        with (locks / f"{name}.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # the other worker runs it
            start = time.time()
            summary = eval_run(model, processor, method, items, path,
                               {"model": MODEL, "weights": WEIGHTS_COMMIT[:12], "question_seed": seed,
                                "per_kind": per_kind}, batch_size=batch_size,
                               progress=False)
            seconds = time.time() - start
            with timing.open("a") as sink:
                sink.write(json.dumps({"setting": name, "seconds": round(seconds, 1), "at": time.time()}) + "\n")
            recall = summarize(path, seed)["recall"]
            print(f"{time.strftime('%H:%M:%S')} {name}: accuracy {100 * summary['accuracy']:.2f}%, "
                  f"kept {summary['mean_kept']}, recall {recall:.3f} ({seconds:.0f} s)", flush=True)

    settings = grid_settings()
    names = list(settings)
    first_rest = names.index(FIRST_AFTER_CM)
    for name in names[:first_rest]:
        run_setting(name, settings[name][3], settings[name][4], EVAL_SEED)
    # the fresh-seed check, once CoreMatching's grid is complete (wait for the other worker's runs)
    for name in names[:first_rest]:
        if "-cm-" in name:
            with (locks / f"{name}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
    layers, best, means = fresh_layers()
    print(f"fresh-seed check at layers {layers} (CoreMatching's recall by layer: {means})", flush=True)
    for name, setting in fresh_settings(layers).items():
        run_setting(name, setting[3], setting[4], FRESH_SEED)
    for name in names[first_rest:]:
        run_setting(name, settings[name][3], settings[name][4], EVAL_SEED)
    print(f"{time.strftime('%H:%M:%S')} worker done", flush=True)


# ----------------------------------------------------------------------------- report


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rec(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def label(prefix: str) -> str:
    return NAMES.get(prefix, "Dense")


def collect() -> dict:
    """"settings": each evaluation setting on its own questions (PER_KIND per kind at the main layer, before the
    LM, for dense and for CoreMatching at layer 0; PER_KIND_LAYERS elsewhere); "view": every evaluation setting on
    the first PER_KIND_LAYERS of each kind, the questions all layers share; "fresh": the fresh-seed check."""
    results = {"settings": {}, "view": {}, "fresh": {}}
    for name, (prefix, layer, tag, method, _) in grid_settings().items():
        for group, view in (("settings", None), ("view", PER_KIND_LAYERS)):
            s = summarize(RUNS / f"{name}.jsonl", view=view)
            if s is not None:
                results[group][name] = {"method": label(prefix), "prefix": prefix, "layer": layer, "budget": tag,
                                        "spec": repr(method), **s}
    layers, best, means = fresh_layers()
    results["fresh_layers"], results["fresh_best_layer"] = layers, best
    results["cm_recall_by_layer"] = {str(k): v for k, v in means.items()}
    for name, (prefix, layer, tag, method, _) in fresh_settings(layers).items():
        s = summarize(RUNS / f"{name}.jsonl", FRESH_SEED)
        if s is not None:
            results["fresh"][name] = {"method": label(prefix), "prefix": prefix, "layer": layer, "budget": tag,
                                      "spec": repr(method), **s}
    timing = RUNS / "timing.jsonl"
    if timing.exists():
        rows = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
        results["timing"] = {"settings_timed": len(rows), "compute_seconds": round(sum(r["seconds"] for r in rows)),
                             "first_start": round(min(r["at"] - r["seconds"] for r in rows)),
                             "last_end": round(max(r["at"] for r in rows))}
        results["timing"]["wall_minutes"] = round((results["timing"]["last_end"] - results["timing"]["first_start"])
                                                  / 60, 1)
    return results


def paired(a: list[bool], b: list[bool]) -> str:
    """Questions only a got right / only b got right, and the two-sided sign-test p-value."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n) if n else 1.0
    return f"{only_a} vs {only_b} (p {'< 0.01' if p < 0.01 else f'= {p:.2f}'})"


def method_rows(results: dict, layer: int) -> list[tuple[str, str]]:
    """(row label, name prefix) of the table of one layer: the layered methods, then those before the LM."""
    rows = [(NAMES[p], f"L{layer}-{p}") for p in LAYERED]
    if layer == MAIN_LAYER:
        rows += [(f"{NAMES[p]} (before the LM)", f"pre-{p}") for p in ("visionzip", "divprune", "cdpruner")]
    return rows


def layer_table(results: dict, layer: int) -> str:
    s = results["settings"] if layer == MAIN_LAYER else results["view"]
    head = "| method | " + " | ".join(f"acc {t}%" for t in BUDGETS) + " | " + " | ".join(
        f"recall {t}%" for t in BUDGETS) + " | adaptive: kept, acc, recall |"
    lines = [head, "|---|" + "---:|" * (2 * len(BUDGETS) + 1)]
    for row_label, stem in method_rows(results, layer):
        accs = [pct(s[f"{stem}-{t}"]["accuracy"]) if f"{stem}-{t}" in s else "-" for t in BUDGETS]
        recs = [rec(s[f"{stem}-{t}"]["recall"]) if f"{stem}-{t}" in s else "-" for t in BUDGETS]
        adaptive = s.get(f"{stem}-adaptive")
        extra = (f"{adaptive['mean_kept']:.1f}, {pct(adaptive['accuracy'])}, {rec(adaptive['recall'])}"
                 if adaptive else "")
        lines.append(f"| {row_label} | " + " | ".join(accs) + " | " + " | ".join(recs) + f" | {extra} |")
    return "\n".join(lines)


def kind_table(results: dict, layer: int, metric: str) -> str:
    s = results["settings"]
    lines = ["| method | budget | " + " | ".join(scenes.KINDS) + " | all |", "|---|---|" + "---:|" * 8]
    show = rec if metric == "recall" else pct
    if metric == "accuracy" and "dense" in s:
        d = s["dense"]
        lines.append("| Dense | 100% | " + " | ".join(pct(d["per_kind"][k]["accuracy"]) for k in scenes.KINDS)
                     + f" | {pct(d['accuracy'])} |")
    for tag in BUDGETS:
        for row_label, stem in method_rows(results, layer):
            entry = s.get(f"{stem}-{tag}")
            if entry is None:
                continue
            cells = [show(entry["per_kind"][k][metric]) for k in scenes.KINDS]
            lines.append(f"| {row_label} | {tag}% | " + " | ".join(cells) + f" | {show(entry[metric])} |")
    return "\n".join(lines)


def layer0_table(results: dict) -> tuple[str, dict]:
    """Each method's accuracy and recall at prune layer 0 against its best layer (of 0, 1, 2, 4, and before the
    language model for DivPrune and CDPruner), on the questions every layer ran."""
    s = results["view"]
    lines = ["| method | budget | acc at L0 | best acc (layer) | acc loss at L0 | recall at L0 | best recall (layer) "
             "| recall loss at L0 |", "|---|---|---:|---|---:|---:|---|---:|"]
    losses = {}
    for prefix in LAYERED:
        for tag in (*BUDGETS, "adaptive"):
            candidates = {layer_key(layer): s.get(f"L{layer}-{prefix}-{tag}") for layer in LAYERS}
            if prefix in ("divprune", "cdpruner"):
                candidates["pre"] = s.get(f"pre-{prefix}-{tag}")
            candidates = {k: v for k, v in candidates.items() if v is not None}
            if "L0" not in candidates:
                continue
            zero = candidates["L0"]
            best_acc = max(candidates, key=lambda k: candidates[k]["accuracy"])
            best_rec = max(candidates, key=lambda k: candidates[k]["recall"])
            acc_loss = candidates[best_acc]["accuracy"] - zero["accuracy"]
            rec_loss = candidates[best_rec]["recall"] - zero["recall"]
            losses[f"{prefix}-{tag}"] = {"accuracy_L0": zero["accuracy"],
                                         "best_accuracy": candidates[best_acc]["accuracy"],
                                         "best_accuracy_layer": best_acc, "accuracy_loss": acc_loss,
                                         "recall_L0": zero["recall"], "best_recall": candidates[best_rec]["recall"],
                                         "best_recall_layer": best_rec, "recall_loss": rec_loss,
                                         "layers_measured": sorted(candidates)}
            lines.append(f"| {NAMES[prefix]} | {tag}{'%' if tag != 'adaptive' else ''} | {pct(zero['accuracy'])} | "
                         f"{pct(candidates[best_acc]['accuracy'])} ({best_acc}) | {100 * acc_loss:.1f} | "
                         f"{rec(zero['recall'])} | {rec(candidates[best_rec]['recall'])} ({best_rec}) | "
                         f"{rec_loss:.3f} |")
    return "\n".join(lines), losses


def fresh_table(results: dict) -> str:
    f = results["fresh"]
    lines = ["| setting | layer | budget | accuracy | recall | kept |", "|---|---:|---|---:|---:|---:|"]
    if "fresh-dense" in f:
        lines.append(f"| Dense | - | 100% | {pct(f['fresh-dense']['accuracy'])} | 1.000 | 64 |")
    for layer in results["fresh_layers"]:
        for tag in FRESH_BUDGETS:
            for prefix in ("cm", "random", "uniform"):
                e = f.get(f"fresh-L{layer}-{prefix}-{tag}")
                if e:
                    lines.append(f"| {NAMES[prefix]} | {layer} | {tag}% | {pct(e['accuracy'])} | {rec(e['recall'])} | "
                                 f"{e['mean_kept']:.1f} |")
    return "\n".join(lines)


def targets(results: dict, group: str, layer: int) -> dict:
    """The issue's targets at one layer: CoreMatching at 25% >= 97% of dense accuracy; at 12.5% at least as
    accurate as the better of Random and Uniform, with at least twice the recall of each."""
    s = results[group]
    pre = "fresh-" if group == "fresh" else ""
    dense = s.get(f"{pre}dense")
    get = lambda p, t: s.get(f"{pre}L{layer}-{p}-{t}")  # noqa: E731
    out = {"layer": layer, "questions": dense["questions"] if dense else None}
    cm25 = get("cm", "25")
    if dense and cm25:
        ratio = cm25["accuracy"] / dense["accuracy"]
        out["cm25_vs_dense"] = {"cm": cm25["accuracy"], "dense": dense["accuracy"], "ratio": ratio,
                                "met": ratio >= 0.97,
                                "paired_cm_vs_dense": paired(cm25["correct"], dense["correct"])}
    cm12, r12, u12 = get("cm", "12.5"), get("random", "12.5"), get("uniform", "12.5")
    if cm12 and r12 and u12:
        best_acc = max(r12["accuracy"], u12["accuracy"])
        best_rec = max(r12["recall"], u12["recall"])
        out["cm12_vs_random_uniform"] = {
            "cm_accuracy": cm12["accuracy"], "random_accuracy": r12["accuracy"], "uniform_accuracy": u12["accuracy"],
            "accuracy_met": cm12["accuracy"] >= best_acc,
            "cm_recall": cm12["recall"], "random_recall": r12["recall"], "uniform_recall": u12["recall"],
            "recall_ratio_to_best": cm12["recall"] / best_rec, "recall_met": cm12["recall"] >= 2 * best_rec,
            "paired_cm_vs_random": paired(cm12["correct"], r12["correct"]),
            "paired_cm_vs_uniform": paired(cm12["correct"], u12["correct"]),
        }
    return out


def target_lines(t: dict, where: str) -> list[str]:
    lines = []
    if "cm25_vs_dense" in t:
        c = t["cm25_vs_dense"]
        lines.append(f"- {where}, CoreMatching at 25% >= 97% of dense accuracy: {pct(c['cm'])} vs dense "
                     f"{pct(c['dense'])} = {100 * c['ratio']:.1f}% of dense: **{'met' if c['met'] else 'missed'}** "
                     f"(questions only CoreMatching / only dense got right: {c['paired_cm_vs_dense']}).")
    if "cm12_vs_random_uniform" in t:
        c = t["cm12_vs_random_uniform"]
        lines.append(f"- {where}, CoreMatching at 12.5% at least as accurate as the better of Random and Uniform: "
                     f"{pct(c['cm_accuracy'])} vs {pct(c['random_accuracy'])} / {pct(c['uniform_accuracy'])}: "
                     f"**{'met' if c['accuracy_met'] else 'missed'}** (only CoreMatching / only Random right: "
                     f"{c['paired_cm_vs_random']}; vs Uniform: {c['paired_cm_vs_uniform']}); with at least twice "
                     f"their recall: {rec(c['cm_recall'])} vs {rec(c['random_recall'])} / {rec(c['uniform_recall'])}, "
                     f"{c['recall_ratio_to_best']:.2f}x the better: **{'met' if c['recall_met'] else 'missed'}**.")
    return lines


def recall_buckets(results: dict) -> tuple[str, dict]:
    """Every pruned answer at the main layer and before the LM (PER_KIND per kind), by how much of its queried
    objects the method kept, against dense's answers to the same questions."""
    items = items_of(EVAL_SEED, PER_KIND)
    dense = {r["index"]: r["correct"] for r in read_rows(RUNS / "dense.jsonl")}
    buckets = {"none kept": [0, 0, 0], "some kept": [0, 0, 0], "all kept": [0, 0, 0]}
    for name in results["settings"]:
        if name == "dense" or not (name.startswith(f"L{MAIN_LAYER}-") or name.startswith("pre-")):
            continue
        for row in read_rows(RUNS / f"{name}.jsonl"):
            value = item_recall(items[row["index"]], row["kept_patches"])
            if value is None:
                continue
            key = "none kept" if value == 0 else "all kept" if value == 1 else "some kept"
            buckets[key][0] += 1
            buckets[key][1] += row["correct"]
            buckets[key][2] += dense[row["index"]]
    lines = ["| queried patches | answers | accuracy | dense on the same questions | difference |",
             "|---|---:|---:|---:|---:|"]
    out = {}
    for key, (n, correct, dense_correct) in buckets.items():
        if n:
            out[key] = {"answers": n, "accuracy": correct / n, "dense_accuracy": dense_correct / n}
            lines.append(f"| {key} | {n} | {pct(correct / n)} | {pct(dense_correct / n)} | "
                         f"{100 * (correct - dense_correct) / n:+.1f} |")
    return "\n".join(lines), out


def kept_map(name: str) -> str:
    """How often each patch of the 8x8 grid was kept (share of questions), as a markdown table."""
    rows = read_rows(RUNS / f"{name}.jsonl")
    counts = torch.zeros(N_VISUAL)
    for row in rows:
        counts[row["kept_patches"]] += 1
    grid = (counts / max(1, len(rows))).reshape(GRID, GRID)
    lines = ["| row | " + " | ".join(f"c{c}" for c in range(GRID)) + " |", "|---|" + "---:|" * GRID]
    for r in range(GRID):
        lines.append(f"| r{r} | " + " | ".join(f"{v:.2f}" for v in grid[r].tolist()) + " |")
    return "\n".join(lines)


def rounded(value, digits: int = 4):
    """The same structure with floats rounded (the JSON stays readable)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def compact_json(results: dict) -> str:
    """One line per entry of each top-level group (one setting a line)."""
    groups = []
    for key, value in results.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            groups.append(f"{json.dumps(key)}: {{\n{inner}\n }}")
        else:
            groups.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(groups) + "\n}\n"


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = collect()
    s = results["settings"]
    n, n_layers = 7 * PER_KIND, 7 * PER_KIND_LAYERS
    parts = ["# Token methods on scenes-smollm2 (`python studies/scenes.py run|report`)", "",
             f"Questions: the first {PER_KIND} of each kind of the evaluation set `scenes.sample({EVAL_POOL}, "
             f"seed={EVAL_SEED})` ({n} in all) at prune layer {MAIN_LAYER} and before the language model; at prune "
             f"layers {', '.join(str(x) for x in LAYERS if x != MAIN_LAYER)} the first {PER_KIND_LAYERS} of each kind "
             f"({n_layers}; the tables of those layers and the layer-0 comparison read every method, layer "
             f"{MAIN_LAYER} included, on these {n_layers}). Greedy answers, exact match. Recall: share of the patches "
             f"at least {int(100 * MIN_COVER)}% covered by the queried objects' mask that the method kept, over the "
             "questions with such a patch. Standard error of one accuracy: about "
             f"{100 * math.sqrt(0.25 / n):.1f} points at {n} questions, {100 * math.sqrt(0.25 / n_layers):.1f} at "
             f"{n_layers}. The adaptive column: mean visual tokens kept, accuracy, recall. Weights: scenes-smollm2 at "
             f"commit {WEIGHTS_COMMIT[:7]} (read from git). VisionZip: dominant + contextual "
             f"{', '.join(f'{d}+{c}' for d, c in VISIONZIP.values())}; PDrop: stages (K, r1), (K+4, r2) with "
             f"(r1, r2) = {', '.join(f'({a:.3g}, {b:.3g})' for a, b in PDROP.values())}, i.e. exactly 32, 16 and 8 "
             "tokens after the second stage.", ""]
    if "dense" in s:
        parts += [f"Dense: {pct(s['dense']['accuracy'])} on the {n} questions, "
                  f"{pct(results['view']['dense']['accuracy'])} on the first {n_layers}.", ""]
    for layer in (MAIN_LAYER, *[x for x in LAYERS if x != MAIN_LAYER]):
        count = n if layer == MAIN_LAYER else n_layers
        title = f"## Prune layer {layer}" + (" (main)" if layer == MAIN_LAYER else "") + f", {count} questions"
        parts += [title, "", layer_table(results, layer), ""]
    parts += [f"## Recall per question kind, prune layer {MAIN_LAYER}", "", kind_table(results, MAIN_LAYER, "recall"),
              "", f"## Accuracy per question kind, prune layer {MAIN_LAYER}", "",
              kind_table(results, MAIN_LAYER, "accuracy"), ""]
    table0, losses = layer0_table(results)
    results["layer0_loss"] = losses
    parts += ["## Loss at prune layer 0 against each method's best layer", "",
              "Loss = best value over the layers measured minus the value at layer 0 (points of accuracy; recall).",
              "", table0, ""]
    buckets_table, buckets = recall_buckets(results)
    results["answers_by_recall"] = buckets
    parts += ["## Does keeping the queried objects turn into right answers?", "",
              f"Every answer of the {len([x for x in s if x.startswith(f'L{MAIN_LAYER}-') or x.startswith('pre-')])} "
              f"pruned settings at prune layer {MAIN_LAYER} and before the LM, grouped by how many of the question's "
              "queried patches the method kept, against dense's answers to the same questions.", "",
              buckets_table, ""]
    background = {name: e["kept_background"] for name, e in s.items() if "kept_background" in e}
    results["kept_background"] = background
    parts += ["## Where the kept tokens lie", "",
              "Share of the kept patches that show no object pixel at all (dense: "
              f"{background.get('dense', float('nan')):.3f} of all patches), 12.5%, prune layer {MAIN_LAYER}: "
              + ", ".join(f"{NAMES[p]} {background[f'L{MAIN_LAYER}-{p}-12.5']:.3f}" for p in LAYERED
                          if f"L{MAIN_LAYER}-{p}-12.5" in background) + ".", "",
              f"How often CoreMatching kept each patch (share of the {7 * PER_KIND} questions), 12.5%, prune layer "
              f"{MAIN_LAYER}:", "", kept_map(f"L{MAIN_LAYER}-cm-12.5"), "",
              f"The same for FastV, 12.5%, prune layer {MAIN_LAYER}:", "", kept_map(f"L{MAIN_LAYER}-fastv-12.5"), ""]
    means = results["cm_recall_by_layer"]
    parts += ["## Fresh-seed check", "",
              f"The first {PER_KIND} questions of each kind of `scenes.sample({FRESH_POOL}, seed={FRESH_SEED})`. "
              "Layers: the main layer and CoreMatching's best layer by queried-object recall on the evaluation "
              "questions (mean of 25% and 12.5%: " + ", ".join(f"L{k} {v:.3f}" for k, v in means.items()) + ").", "",
              fresh_table(results), ""]
    results["targets"] = {}
    lines = []
    for layer in LAYERS:
        t = targets(results, "settings" if layer == MAIN_LAYER else "view", layer)
        results["targets"][f"eval-L{layer}"] = t
        lines += target_lines(t, f"evaluation questions, layer {layer}")
    for layer in results["fresh_layers"]:
        t = targets(results, "fresh", layer)
        results["targets"][f"fresh-L{layer}"] = t
        lines += target_lines(t, f"fresh seed, layer {layer}")
    parts += ["## Targets", "", *lines, ""]
    if "timing" in results:
        t = results["timing"]
        parts += [f"Compute: {t['settings_timed']} settings, {t['compute_seconds'] / 60:.0f} process-minutes, "
                  f"{t['wall_minutes']} minutes of wall time from the first setting's start to the last one's end.", ""]
    (RESULTS / "scenes.md").write_text("\n".join(parts))
    for group in ("settings", "view", "fresh"):
        for entry in results[group].values():
            entry.pop("correct", None)
    results["config"] = {"per_kind": PER_KIND, "eval": [EVAL_POOL, EVAL_SEED], "fresh": [FRESH_POOL, FRESH_SEED],
                         "min_cover": MIN_COVER, "layers": LAYERS, "main_layer": MAIN_LAYER, "budgets": BUDGETS,
                         "visionzip": VISIONZIP, "pdrop_ratios": PDROP}
    (RESULTS / "scenes.json").write_text(compact_json(rounded(results)))
    print("\n".join(parts))
    plots(results)
    pictures()


STYLES = {"cm": "o-", "random": "s--", "uniform": "^:", "fastv": "v-", "dart": "D-", "divprune": "P-",
          "cdpruner": "X-", "pdrop": "<-", "visionzip": "h-"}


def draw(ax, entries: list[tuple[float, dict]], metric: str, style: str, ms: int = 5, **kwargs) -> None:
    """One method's line: x against its accuracy (in %, with 95% intervals from the number of questions) or its
    recall (a mean over questions, drawn without an interval)."""
    from corematching.stats import wilson_interval

    xs = [x for x, _ in entries]
    if metric != "accuracy":
        ax.plot(xs, [e[metric] for _, e in entries], style, ms=ms, **kwargs)
        return
    ys, below, above = [], [], []
    for _, e in entries:
        low, high = wilson_interval(round(e["accuracy"] * e["questions"]), e["questions"])
        ys.append(100 * e["accuracy"])
        below.append(ys[-1] - 100 * low)
        above.append(100 * high - ys[-1])
    ax.errorbar(xs, ys, yerr=[below, above], fmt=style, ms=ms, capsize=2, elinewidth=0.8, **kwargs)


def plots(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    DOCS.mkdir(parents=True, exist_ok=True)
    dense = s.get("dense")
    for metric, ylabel, file in (("recall", "queried-object recall (share of their patches kept)", "recall.png"),
                                 ("accuracy", "accuracy (%)", "accuracy.png")):
        fig, (ax, ax_layers) = plt.subplots(1, 2, figsize=(12, 4.8))
        lines = [(NAMES[p], f"L{MAIN_LAYER}-{p}", p, 1.0) for p in LAYERED]
        lines += [(f"{NAMES[p]} (before LM)", f"pre-{p}", p, 0.45) for p in ("visionzip", "divprune", "cdpruner")]
        for number, (name, stem, prefix, alpha) in enumerate(lines):
            dodge = 2 ** (0.025 * (number - (len(lines) - 1) / 2))  # side by side on the log axis
            entries = [(dodge * budget / N_VISUAL, s[f"{stem}-{tag}"]) for tag, budget in
                       sorted(BUDGETS.items(), key=lambda kv: kv[1]) if f"{stem}-{tag}" in s]
            if entries:
                draw(ax, entries, metric, STYLES[prefix], label=name, alpha=alpha if prefix != "visionzip" else 1.0)
        adaptive = s.get(f"L{MAIN_LAYER}-cm-adaptive")
        if adaptive:
            draw(ax, [(adaptive["mean_kept"] / N_VISUAL, adaptive)], metric, "k*", label="CoreMatching adaptive",
                 ms=13)
        if dense and metric == "accuracy":
            ax.axhline(100 * dense["accuracy"], color="gray", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xticks([b / N_VISUAL for b in BUDGETS.values()], [f"{t}%" for t in BUDGETS])
        ax.set_xlabel("visual tokens kept (share of 64)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"prune layer {MAIN_LAYER}, {7 * PER_KIND} questions ('before LM': removed before layer 0)"
                     + ("\nbars: 95% intervals from the number of questions" if metric == "accuracy" else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        view = results["view"]
        for prefix in LAYERED:
            # side by side within each layer, so that the intervals do not hide each other
            offset = 0.05 * (LAYERED.index(prefix) - (len(LAYERED) - 1) / 2)
            entries = [(layer + offset, view[f"L{layer}-{prefix}-12.5"]) for layer in LAYERS
                       if f"L{layer}-{prefix}-12.5" in view]
            if entries:
                draw(ax_layers, entries, metric, STYLES[prefix], label=NAMES[prefix])
        if "dense" in view and metric == "accuracy":
            ax_layers.axhline(100 * view["dense"]["accuracy"], color="gray", lw=1, label="dense")
        ax_layers.set_xticks(list(LAYERS))
        ax_layers.set_xlabel("prune layer")
        ax_layers.set_ylabel(ylabel)
        ax_layers.set_title(f"12.5% of the visual tokens (8 of 64), by prune layer ({7 * PER_KIND_LAYERS} questions)",
                            fontsize=10)
        ax_layers.grid(alpha=0.3)
        ax_layers.legend(fontsize=7, ncol=2)
        fig.suptitle(f"scenes-smollm2 (weights {WEIGHTS_COMMIT[:7]}), evaluation set sample(700, seed=1), the first "
                     "questions of each kind")
        fig.tight_layout()
        fig.savefig(DOCS / file, dpi=110)
        plt.close(fig)


def pictures() -> None:
    """For the first question of a few kinds: the queried patches, then what each method kept at 12.5%."""
    import tempfile

    from PIL import Image

    from corematching.apps.viz import kept_patches_overlay, save_side_by_side

    items = balanced(EVAL_SEED, EVAL_POOL)
    panels_of = [(f"L{MAIN_LAYER}-{p}-12.5", NAMES[p]) for p in LAYERED]
    panels_of.append(("pre-visionzip-12.5", "VisionZip 7+1"))
    dense = {row["index"]: row for row in read_rows(RUNS / "dense.jsonl")}
    for kind in PICTURE_KINDS:
        k = next(i for i, item in enumerate(items) if item.kind == kind)
        item = items[k]
        queried = queried_patches(item.mask, GRID, MIN_COVER).nonzero().flatten().tolist()
        dense_answer = dense[k]["prediction"] if k in dense else "?"
        panels = [kept_patches_overlay(item.image, queried, (GRID, GRID), scale=2,
                                       title=f"{item.question} -> {item.answer}"),
                  kept_patches_overlay(item.image, list(range(N_VISUAL)), (GRID, GRID), scale=2,
                                       title=f"Dense: {dense_answer}")]
        for name, title in panels_of:
            rows = {row["index"]: row for row in read_rows(RUNS / f"{name}.jsonl")}
            if k not in rows:
                continue
            row = rows[k]
            recall = item_recall(item, row["kept_patches"])
            recall_text = "" if recall is None else f", recall {recall:.2f}"
            panels.append(kept_patches_overlay(item.image, row["kept_patches"], (GRID, GRID), scale=2,
                                               title=f"{title}: {row['prediction']}{recall_text}"))
        # two rows of panels, each row laid out by save_side_by_side
        with tempfile.TemporaryDirectory() as tmp:
            half = (len(panels) + 1) // 2
            rows = [Image.open(save_side_by_side(panels[i : i + half], Path(tmp) / f"row{i}.png")).copy()
                    for i in range(0, len(panels), half)]
        sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 8), (255, 255, 255))
        sheet.paste(rows[0], (0, 0))
        if len(rows) > 1:
            sheet.paste(rows[1], (0, rows[0].height + 8))
        sheet.save(DOCS / f"kept-{kind}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("run", "report", "plots"),
                        help="plots: redraw docs/scenes/{accuracy,recall}.png from studies/results/scenes.json")
    parser.add_argument("--only", nargs="*", help="run only these setting names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()
    if args.stage == "run":
        import torch

        torch.set_num_threads(args.threads)
        run_worker(set(args.only) if args.only else None, args.batch_size)
    elif args.stage == "plots":
        plots(json.loads((RESULTS / "scenes.json").read_text()))
    else:
        report()


if __name__ == "__main__":
    main()
