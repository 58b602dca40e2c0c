"""Neuron sparsity at decode on SmolLM2-135M-Instruct alone, with real text.

Passages come from the Python documentation shipped with the standard library (`pydoc_data.topics`). Each
passage gives a 128-token prompt and the next 64 tokens as its held-out continuation. With core neurons
chosen from the prompt's prefill (beta of the FFN width, per layer), we measure

- the perplexity of the held-out continuations, teacher-forced through the sliced FFNs;
- the agreement of 64 greedy tokens with dense greedy decoding (share of positions that match).

`corematching.sparsify` works on vision-language models; for a text-only model this script drives the same
pieces itself: the prompt is prefilled densely while each FFN's activation is recorded, `CoreMatching.
select_neurons` picks each layer's core neurons over all prompt tokens, and every later call runs those FFNs
through `SlicedFFN` (weights gathered once).

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
from corematching.models import FFNParts
from corematching.runtime.ffn import SlicedFFN
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


class CoreNeuronDecoding:
    """Dense prefill that records FFN activations, then core-neuron FFNs for every later call."""

    def __init__(self, model, method: cm.CoreMatching, layers: list[int], magnitude: bool = False):
        self.model, self.method, self.magnitude = model, method, magnitude
        self.mlps = {layer: model.model.layers[layer].mlp for layer in layers}
        self.sliced: dict[int, SlicedFFN] = {}
        self.activations: dict[int, torch.Tensor] = {}
        self.handles = [mlp.down_proj.register_forward_pre_hook(self._recorder(layer))
                        for layer, mlp in self.mlps.items()]

    def _recorder(self, layer):
        def record(module, inputs):
            activation = inputs[0].detach()
            self.activations[layer] = activation.abs() if self.magnitude else activation

        return record

    def start_decoding(self) -> None:
        """Choose each layer's core neurons from the recorded prefill and switch its FFN to them."""
        for layer, mlp in self.mlps.items():
            activation = self.activations.pop(layer)  # [1, T, F]
            mask = torch.ones(activation.shape[:2], dtype=torch.bool)
            neurons = self.method.select_neurons(activation, mask, layer)  # [1, k]
            parts = FFNParts(module=mlp, up=mlp.up_proj, down=mlp.down_proj, act=mlp.act_fn, gate=mlp.gate_proj)
            mlp.forward = SlicedFFN.gather(parts, neurons)  # instance attribute: shadows the class forward

    def end_decoding(self) -> None:
        for mlp in self.mlps.values():
            mlp.__dict__.pop("forward", None)

    def remove(self) -> None:
        self.end_decoding()
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measure(model, windows, method, layers, dense_tokens, magnitude=False) -> dict:
    driver = CoreNeuronDecoding(model, method, layers, magnitude) if method is not None else None
    start = time.perf_counter()
    nll, count, agreement, tokens = 0.0, 0, [], []
    try:
        for k, window in enumerate(windows):
            prompt, continuation = window[None, :PROMPT_TOKENS], window[None, PROMPT_TOKENS:]
            # perplexity: dense prefill, then the continuation teacher-forced in one decode call
            prefill = model(input_ids=prompt, use_cache=True)
            if driver:
                driver.start_decoding()
            decode = model(input_ids=continuation[:, :-1], cache=prefill.cache, use_cache=True)
            if driver:
                driver.end_decoding()
            logits = torch.cat([prefill.logits[:, -1:], decode.logits], dim=1)[0]
            nll += torch.nn.functional.cross_entropy(logits.float(), continuation[0], reduction="sum").item()
            count += continuation.shape[1]
            # greedy: dense prefill, then one token at a time through the core neurons
            prefill = model(input_ids=prompt, use_cache=True)
            if driver:
                driver.start_decoding()
            cache, next_token, generated = prefill.cache, prefill.logits[:, -1].argmax(-1, keepdim=True), []
            for _ in range(CONTINUATION_TOKENS):
                generated.append(next_token)
                step = model(input_ids=next_token, cache=cache, use_cache=True)
                cache, next_token = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
            if driver:
                driver.end_decoding()
            generated = torch.cat(generated, dim=1)[0]
            tokens.append(generated)
            if dense_tokens is not None:
                agreement.append((generated == dense_tokens[k]).float().mean().item())
    finally:
        if driver:
            driver.remove()
    return {
        "perplexity": math.exp(nll / count),
        "agreement": sum(agreement) / len(agreement) if agreement else 1.0,
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--magnitude", action="store_true",
                        help="variant: rank neurons by |a| instead of positive a (SwiGLU activations are signed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.eval()
    windows = passages(tokenizer, args.passages)
    num_layers = model.config.num_hidden_layers
    dense = measure(model, windows, None, [], None)
    rows = [("dense", "-", "-", dense)]
    print(f"dense: perplexity {dense['perplexity']:.3f}", flush=True)
    settings = [(beta, None, "all") for beta in (1.0, 0.6, 0.4, 0.25)]
    settings += [(0.4, list(range(3, num_layers)), "3..29"), (0.4, list(range(1, num_layers)), "1..29"),
                 (0.25, list(range(3, num_layers)), "3..29")]
    for beta, layers, layer_label in settings:
        layers = layers if layers is not None else list(range(num_layers))
        method = cm.CoreMatching(beta=beta, neuron_layers=layers)
        result = measure(model, windows, method, layers, dense["tokens"], args.magnitude)
        rows.append(("core neurons, |a|" if args.magnitude else "core neurons", beta, layer_label, result))
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
    name = "neurons-magnitude" if args.magnitude else "neurons"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        [{"decoding": decoding, "beta": b, "layers": ly, "perplexity": r["perplexity"], "agreement": r["agreement"]}
         for decoding, b, ly, r in rows], indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
