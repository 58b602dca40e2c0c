"""Neuron sparsity at decode on SmolLM2-135M-Instruct alone, with real text.

Passages come from the Python documentation shipped with the standard library (`pydoc_data.topics`). Each
passage gives a 128-token prompt and the next 64 tokens as its held-out continuation. With core neurons
chosen from the prompt's prefill (beta of the FFN width, per layer), we measure

- the perplexity of the held-out continuations, teacher-forced through the sliced FFNs;
- the agreement of 64 greedy tokens with dense greedy decoding (share of positions that match).

    python studies/neurons.py            # writes studies/results/neurons.md and neurons.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import corematching as cm
from corematching.zoo.smollm2 import load_smollm2

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 128
CONTINUATION_TOKENS = 64


def passages(tokenizer, count: int) -> list[torch.Tensor]:
    """`count` windows of prompt + continuation tokens, one per documentation topic, in sorted topic order."""
    from pydoc_data.topics import topics

    windows = []
    for name in sorted(topics):
        ids = tokenizer(topics[name], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if len(ids) >= PROMPT_TOKENS + CONTINUATION_TOKENS:
            windows.append(ids[: PROMPT_TOKENS + CONTINUATION_TOKENS])
        if len(windows) == count:
            break
    return windows


@torch.no_grad()
def continuation_nll(model, window: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the continuation: dense prefill of the prompt, then the continuation as one decode call."""
    prompt, continuation = window[None, :PROMPT_TOKENS], window[None, PROMPT_TOKENS:]
    prefill = model(input_ids=prompt, use_cache=True)
    decode = model(input_ids=continuation[:, :-1], cache=prefill.cache, use_cache=True)
    logits = torch.cat([prefill.logits[:, -1:], decode.logits], dim=1)[0]  # [64, V]
    nll = torch.nn.functional.cross_entropy(logits.float(), continuation[0], reduction="sum")
    return nll.item(), continuation.shape[1]


@torch.no_grad()
def greedy(model, window: torch.Tensor) -> torch.Tensor:
    prompt = window[None, :PROMPT_TOKENS]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=CONTINUATION_TOKENS,
                         min_new_tokens=CONTINUATION_TOKENS, do_sample=False)
    return out[0, PROMPT_TOKENS:]


def measure(model, windows, method, dense_tokens) -> dict:
    session = cm.sparsify(model, method) if method is not None else None
    try:
        start = time.perf_counter()
        nll, count = 0.0, 0
        agreement = []
        tokens = []
        for k, window in enumerate(windows):
            total, n = continuation_nll(model, window)
            nll, count = nll + total, count + n
            generated = greedy(model, window)
            tokens.append(generated)
            if dense_tokens is not None:
                agreement.append((generated == dense_tokens[k]).float().mean().item())
    finally:
        if session is not None:
            session.remove()
    return {
        "perplexity": math.exp(nll / count),
        "agreement": sum(agreement) / len(agreement) if agreement else 1.0,
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.eval()
    windows = passages(tokenizer, args.passages)
    num_layers = model.config.num_hidden_layers
    dense = measure(model, windows, None, None)
    rows = [("dense", "-", "-", dense)]
    print(f"dense: perplexity {dense['perplexity']:.3f}", flush=True)
    settings = [(beta, None, "all") for beta in (1.0, 0.6, 0.4, 0.25)]
    settings += [(0.4, list(range(3, num_layers)), "3..29"), (0.4, list(range(1, num_layers)), "1..29"),
                 (0.25, list(range(3, num_layers)), "3..29")]
    for beta, layers, layer_label in settings:
        method = cm.CoreMatching(beta=beta, neuron_layers=layers if layers is not None else list(range(num_layers)))
        result = measure(model, windows, method, dense["tokens"])
        rows.append((f"core neurons", beta, layer_label, result))
        print(f"beta {beta} layers {layer_label}: perplexity {result['perplexity']:.3f} "
              f"agreement {result['agreement']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"### Decode with core neurons: SmolLM2-135M-Instruct, {len(windows)} pydoc passages, "
             f"{PROMPT_TOKENS}-token prompts, {CONTINUATION_TOKENS}-token continuations", "",
             "| decoding | beta | layers | continuation perplexity | vs dense | greedy agreement (64 tokens) |",
             "|---|---|---|---|---|---|"]
    for label, beta, layers, r in rows:
        ratio = r["perplexity"] / dense["perplexity"]
        lines.append(f"| {label} | {beta} | {layers} | {r['perplexity']:.3f} | {100 * (ratio - 1):+.1f}% | "
                     f"{100 * r['agreement']:.1f}% |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "neurons.md").write_text(text)
    (RESULTS / "neurons.json").write_text(json.dumps(
        [{"decoding": l, "beta": b, "layers": ly, "perplexity": r["perplexity"], "agreement": r["agreement"]}
         for l, b, ly, r in rows], indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
