"""Dense vs CoreMatching on a LLaVA-shaped model with real layer sizes (random weights), fp32 on CPU.

The language model has TinyLlama-1.1B's widths (hidden 2048, FFN 5632, 32 heads, 4 KV heads, vocabulary 32064 as
LLaVA-1.5) and 8 layers; the prompt is 576 visual tokens and 40 text tokens. The vision tower is a small CLIP;
its features are computed once and passed as `mm_encoder_outputs`, so the timings cover the language model
(embedding, decoder layers, LM head) and everything corematching does inside it.

CoreMatching: prune_layer 1, 64 visual tokens kept, beta 0.4 on every layer (rho 0.2, match "text").
Both run in one process, repetitions interleaved (each rep a back-to-back pair, the order alternating);
times are medians, speedups the median of the ratios within pairs, which follows a shared CPU's changing
load better. Each run is
one `model.generate` call (greedy, 32 new tokens); a logits processor stamps the time after every forward, which
gives prefill time (start to first stamp), per-token decode time (between stamps) and end-to-end time.
Peak memory is the process RSS sampled every millisecond during one extra run of each, after freed memory
has been handed back to the OS. A last line shows how much of a sparse prefill CoreMatching spends choosing its
tokens and core neurons (its selection calls timed in a few extra prefills).

    python benchmarks/bench_engine.py            # what benchmarks/RESULTS.md shows
    python benchmarks/bench_engine.py --reps 2   # quicker
    python benchmarks/bench_engine.py --batches 1 4 8   # core-neuron decoding per batch size, per scheme
    python benchmarks/bench_engine.py --batches 1 4 --schemes "union copy" "in place"
    python benchmarks/bench_engine.py --breakdown --reps 4 --threads 1   # where the sparse prefill's time goes

The batch table compares ways of decoding a batch with per-sample core neurons, in one run, repetitions
interleaved: one sliced copy of the FFN per sample (the earlier scheme, batched matmuls over [B, k, H] weights);
one copy of the union of the samples' core neurons with each sample's activation masked to its own set
(`neuron_weights="copy"`, the default); and the same union as views of the model's own weights, its neurons
moved first in place (`neuron_weights="in_place"`). For each batch size it reports the memory the scheme keeps
beside the model's weights (what its sliced FFNs hold: gathered weights, row masks, swap indices), the peak RSS
above the loaded model during one more generate call of each (KV cache, activations and transients included),
the decode time per token, the speedup against dense decoding at the same batch size, the time spent preparing
the sliced FFNs of a prompt (gathering the copies, or swapping the neurons, at its first decode step) and the
time of the session's removal (swapping the neurons back in place).
"""

import argparse
import gc
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

import corematching as cm
from corematching.apps.bench import peak_rss_during
from corematching.runtime.ffn import SlicedFFN as SLICED_FFN

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 2048, 5632, 32, 4, 8, 32064
IMAGE_TOKEN = 32000
VISUAL, TEXT = 576, 40
PRUNE_LAYER, KEPT_VISUAL, BETA = 1, 64, 0.4
METHOD = cm.CoreMatching(
    prune_layer=PRUNE_LAYER, token_budget=KEPT_VISUAL, beta=BETA, neuron_layers=list(range(LAYERS))
)


def build_model() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_inputs(model) -> dict:
    """[BOS, 5 text, 576 image, 34 text] with the image features precomputed."""
    generator = torch.Generator().manual_seed(1)
    before = torch.randint(3, 32000, (5,), generator=generator)
    after = torch.randint(3, 32000, (TEXT - 6,), generator=generator)
    input_ids = torch.cat([torch.tensor([1]), before, torch.full((VISUAL,), IMAGE_TOKEN), after]).unsqueeze(0)
    pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    image = BaseModelOutputWithPooling(pooler_output=[f.detach() for f in features])
    return {"input_ids": input_ids, "mm_encoder_outputs": {"image": image}}


class StepClock(LogitsProcessor):
    """Stamps the time each time generation has new logits, i.e. after every forward."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def run(model, method, inputs, new_tokens: int) -> dict:
    clock = StepClock()
    session = cm.sparsify(model, method) if method is not None else nullcontext()
    with session, torch.no_grad():
        start = time.perf_counter()
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        end = time.perf_counter()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"prefill": clock.stamps[0] - start, "steps": steps, "end_to_end": end - start}


class TimedSelection:
    """Wraps a method's selection calls (tokens, core neurons) and sums their wall time in `seconds`; `add`, when
    given, is called with each call's seconds as well."""

    CALLS = ("select_tokens", "select_neurons", "select_tokens_and_neurons")

    def __init__(self, method, add=None):
        self.method, self.seconds, self.add = method, 0.0, add

    def __enter__(self):
        for name in self.CALLS:
            original = getattr(self.method, name)

            def timed(*args, original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent = time.perf_counter() - start
                    self.seconds += spent
                    if self.add is not None:
                        self.add(spent)

            setattr(self.method, name, timed)  # an instance attribute shadows the class's method
        return self

    def __exit__(self, *exc):
        for name in self.CALLS:
            delattr(self.method, name)


def selection_share(model, method, inputs, reps: int) -> tuple[float, float]:
    """(median selection time, median prefill time) of `reps` sparse prefills, in seconds: the part of the
    prefill the method spends choosing its tokens and core neurons."""
    selection, prefill = [], []
    for _ in range(reps):
        with TimedSelection(method) as timer, cm.sparsify(model, method), torch.no_grad():
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
        selection.append(timer.seconds)
    return statistics.median(selection), statistics.median(prefill)


def peak_rss(model, method, inputs, new_tokens: int) -> tuple[int, int]:
    """(RSS before the run, peak RSS during it), sampled every millisecond."""
    return peak_rss_during(lambda: run(model, method, inputs, new_tokens))


# ---------------------------------------------------------------------------------------------- prefill breakdown


class LayerClock:
    """Wall time of each decoder layer (its pre-hooks included, so the engine's token choice before layer K + 1
    counts in that layer) and of the selection calls made while each layer runs."""

    def __init__(self, model, method):
        self.layers = model.model.language_model.layers
        self.method = method
        self.seconds, self.selection, self.current = {}, {}, None

    def __enter__(self):
        def before(module, args, kwargs, layer):
            self.current = layer
            self.seconds[layer] = self.seconds.get(layer, 0.0) - time.perf_counter()

        def after(module, args, kwargs, output, layer):
            self.seconds[layer] += time.perf_counter()
            self.current = None

        self.handles = []
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, a, k, index=index: before(m, a, k, index), with_kwargs=True, prepend=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, a, k, o, index=index: after(m, a, k, o, index), with_kwargs=True))
        self.timer = TimedSelection(self.method, self.add_selection) if self.method is not None else None
        if self.timer is not None:
            self.timer.__enter__()
        return self

    def add_selection(self, seconds: float) -> None:
        layer = -1 if self.current is None else self.current
        self.selection[layer] = self.selection.get(layer, 0.0) + seconds

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        if self.timer is not None:
            self.timer.__exit__(*exc)


def timed_prefill(model, method, inputs) -> tuple[float, LayerClock]:
    session = cm.sparsify(model, method) if method is not None else nullcontext()
    with session, torch.no_grad(), LayerClock(model, method) as clock:
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        total = time.perf_counter() - start
    return total, clock


def prefill_breakdown(model, inputs, reps: int, kept: int) -> None:
    """Dense and sparse prefills (model(...) with logits for the last token, as generate's), interleaved; per part
    of the model, the median times and what the sparse part would take at the dense part's time per FLOP."""
    parts = {  # name -> (layers, sparse FLOPs / dense FLOPs of the part)
        f"layers 0..{PRUNE_LAYER} (all tokens)": (range(PRUNE_LAYER + 1), 1.0),
        f"layer {PRUNE_LAYER + 1} (token choice + kept tokens)": ([PRUNE_LAYER + 1], None),
        f"layers {PRUNE_LAYER + 2}..{LAYERS - 1} (kept tokens)": (range(PRUNE_LAYER + 2, LAYERS), None),
    }
    prompt = VISUAL + TEXT
    upper = layer_flops(kept, causal_context(kept), FFN) / layer_flops(prompt, causal_context(prompt), FFN)
    runs = {"dense": [], "sparse": []}
    for method in (None, METHOD):
        timed_prefill(model, method, inputs)  # warm-up
    for rep in range(reps):
        order = [("dense", None), ("sparse", METHOD)]
        for name, method in order if rep % 2 == 0 else reversed(order):
            gc.collect()
            runs[name].append(timed_prefill(model, method, inputs))

    def median(name, layers=None, selection=False):
        values = []
        for total, clock in runs[name]:
            if layers is None:
                values.append(total - sum(clock.seconds.values()))
            else:
                source = clock.selection if selection else clock.seconds
                values.append(sum(source.get(layer, 0.0) for layer in layers))
        return statistics.median(values) * 1e3

    dense_total = statistics.median(total for total, _ in runs["dense"]) * 1e3
    sparse_total = statistics.median(total for total, _ in runs["sparse"]) * 1e3
    bound = prefill_flops(None) / prefill_flops(kept)
    print(f"{reps} interleaved prefills of each, {torch.get_num_threads()} threads, medians in ms; 'at dense speed': "
          "the dense part's time scaled by the part's FLOP ratio")
    print()
    print("| part | dense | CoreMatching | of which selection | at dense speed | excess |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [(name, list(layers), ratio if ratio is not None else upper) for name, (layers, ratio) in parts.items()]
    for name, layers, ratio in rows:
        dense, sparse = median("dense", layers), median("sparse", layers)
        selection = median("sparse", layers, selection=True)
        expected = dense * ratio
        print(f"| {name} | {dense:.1f} | {sparse:.1f} | {selection:.1f} | {expected:.1f} | {sparse - expected:+.1f} |")
    dense_out, sparse_out = median("dense"), median("sparse")
    print(f"| outside the decoder layers (embedding, image features, LM head) | {dense_out:.1f} | {sparse_out:.1f} | "
          f"| {dense_out:.1f} | {sparse_out - dense_out:+.1f} |")
    print(f"| total | {dense_total:.1f} | {sparse_total:.1f} | | {dense_total / bound:.1f} (FLOP bound) | "
          f"{sparse_total - dense_total / bound:+.1f} |")
    print()
    paired = statistics.median(d[0] / s[0] for d, s in zip(runs["dense"], runs["sparse"]))
    selection = median("sparse", range(LAYERS), selection=True)
    print(f"prefill speedup {paired:.2f}x (median of paired ratios) against a FLOP bound of {bound:.2f}x: "
          f"{paired / bound:.2f} of the bound; selection {selection:.1f} ms ({selection / sparse_total:.1%})")


# ---------------------------------------------------------------------------------------------- analytic FLOPs


def layer_flops(tokens: int, context_sum: int, ffn_width: int) -> float:
    """FLOPs (2 per multiply-add) of one decoder layer for `tokens` queries whose attention contexts sum to
    context_sum keys. Projections, attention scores and values, FFN; norms and RoPE are negligible."""
    head_dim = HIDDEN // HEADS
    kv_width = KV_HEADS * head_dim
    projections = tokens * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv_width)
    attention = context_sum * 2 * HIDDEN  # QK^T and AV over all heads
    ffn = tokens * 3 * HIDDEN * ffn_width
    return 2.0 * (projections + attention + ffn)


def causal_context(tokens: int) -> int:
    return tokens * (tokens + 1) // 2


def prefill_flops(kept: int | None) -> float:
    """Prompt pass; lm_head on the last token only. kept: tokens after the prune layer (None: dense)."""
    prompt = VISUAL + TEXT
    total = 0.0
    for layer in range(LAYERS):
        tokens = prompt if kept is None or layer <= PRUNE_LAYER else kept
        total += layer_flops(tokens, causal_context(tokens), FFN)
    return total + 2.0 * HIDDEN * VOCAB


def decode_flops(kept: int | None, new_tokens: int, core_width: int | None) -> float:
    """Mean FLOPs of one decode step over the new tokens after the first (contexts grow by one per step)."""
    prompt = VISUAL + TEXT
    total = 0.0
    for step in range(1, new_tokens):
        for layer in range(LAYERS):
            prefix = prompt if kept is None or layer <= PRUNE_LAYER else kept
            width = FFN if core_width is None else core_width
            total += layer_flops(1, prefix + step + 1, width)
        total += 2.0 * HIDDEN * VOCAB
    return total / (new_tokens - 1)


# ---------------------------------------------------------------------------------------------- batches


class PerSampleSlicedFFN:
    """The earlier scheme, for comparison: every sample gets its own gathered copy of its core neurons' weights
    (gate, up [B, k, H]; down [B, H, k]) and the FFN runs as batched matmuls."""

    swap = None  # not a view of the model's weights

    def __init__(self, up, down, gate, act):
        self.up, self.down, self.gate, self.act = up, down, gate, act

    @classmethod
    def gather(cls, parts, neurons, sparse_rows):
        batch, k = neurons.shape
        flat = neurons.reshape(-1)
        up = parts.up.weight.detach().index_select(0, flat).view(batch, k, -1)
        gate = parts.gate.weight.detach().index_select(0, flat).view(batch, k, -1)
        down_weight = parts.down.weight.detach()
        down = down_weight.index_select(1, flat).view(down_weight.shape[0], batch, k).permute(1, 0, 2).contiguous()
        return cls(up, down, gate, parts.act)

    @property
    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down, self.gate))

    def __call__(self, hidden, rows):
        up, gate, down = self.up[rows], self.gate[rows], self.down[rows]
        activation = self.act(torch.bmm(hidden, gate.transpose(1, 2))) * torch.bmm(hidden, up.transpose(1, 2))
        return torch.bmm(activation, down.transpose(1, 2))


def build_batch_inputs(model, batch: int) -> dict:
    """`batch` prompts of the same shape, each with its own text and image (so their core neurons differ)."""
    generator = torch.Generator().manual_seed(2)
    rows, features = [], []
    for _ in range(batch):
        before = torch.randint(3, 32000, (5,), generator=generator)
        after = torch.randint(3, 32000, (TEXT - 6,), generator=generator)
        rows.append(torch.cat([torch.tensor([1]), before, torch.full((VISUAL,), IMAGE_TOKEN), after]))
        pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
        with torch.no_grad():
            features.append(model.model.get_image_features(pixel_values=pixel_values).pooler_output[0].detach())
    image = BaseModelOutputWithPooling(pooler_output=features)
    return {"input_ids": torch.stack(rows), "mm_encoder_outputs": {"image": image}}


BATCH_SCHEMES = ("dense", "per-sample copies", "union copy", "in place")


def run_scheme(model, inputs, scheme: str, new_tokens: int) -> dict:
    """One generate call under a scheme: step stamps, the extra bytes its sliced FFNs report, the time spent
    preparing them (gathering copies, or swapping neurons in place) and the time of the session's removal (which
    swaps the neurons back in place)."""
    from corematching.runtime import engine as engine_module

    clock = StepClock()
    result = {"extra": 0, "prepare": 0.0, "remove": 0.0}
    if scheme == "dense":
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]))
        return {**result, "stamps": clock.stamps}
    if scheme == "per-sample copies":
        engine_module.SlicedFFN = PerSampleSlicedFFN
    try:
        session = cm.sparsify(model, METHOD, neuron_weights="in_place" if scheme == "in place" else "copy")
        engine = session.engine
        sliced_ffn = engine._sliced_ffn

        def timed_sliced_ffn(*args):
            start = time.perf_counter()
            try:
                return sliced_ffn(*args)
            finally:
                result["prepare"] += time.perf_counter() - start

        engine._sliced_ffn = timed_sliced_ffn
        try:
            cache = DynamicCache(config=model.config.get_text_config())  # keeps the conversation's slices alive
            with torch.no_grad():
                model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, do_sample=False,
                               logits_processor=LogitsProcessorList([clock]))
            ffns = [ffn for _, per_layer in engine._sliced.values() for ffn in per_layer.values() if ffn is not None]
            result["extra"] = sum(ffn.extra_bytes for ffn in ffns)
        finally:
            start = time.perf_counter()
            session.remove()
            result["remove"] = time.perf_counter() - start
    finally:
        engine_module.SlicedFFN = SLICED_FFN
    return {**result, "stamps": clock.stamps}


def batch_table(model, batches: list[int], schemes: list[str], reps: int, new_tokens: int) -> None:
    schemes = ["dense", *(name for name in schemes if name != "dense")]
    print("| batch | scheme | extra weights (MiB) | peak RSS above the model (MiB) | decode time per token (ms) | "
          "speedup vs dense | prepare per prompt (ms) | swap back (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        inputs = build_batch_inputs(model, batch)
        step_times = {name: [] for name in schemes}
        prepare = {name: [] for name in schemes}
        remove = {name: [] for name in schemes}
        extra = {}
        for rep in range(reps + 1):  # the first rep warms up and is not timed
            order = schemes if rep % 2 == 0 else list(reversed(schemes))
            for name in order:
                gc.collect()
                result = run_scheme(model, inputs, name, new_tokens)
                extra[name] = result["extra"]
                if rep > 0:
                    stamps = result["stamps"]
                    step_times[name].append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
                    prepare[name].append(result["prepare"])
                    remove[name].append(result["remove"])
        peak = {}
        for name in schemes:  # one more run of each, RSS sampled every millisecond
            gc.collect()
            before, top = peak_rss_during(lambda name=name, inputs=inputs: run_scheme(model, inputs, name, new_tokens))
            peak[name] = top - before
        for name in schemes:
            per_token = statistics.median(step_times[name])
            ratios = [d / s for d, s in zip(step_times["dense"], step_times[name])]
            costs = "| - | - |" if name == "dense" else (
                f"| {statistics.median(prepare[name]) * 1e3:.1f} | {statistics.median(remove[name]) * 1e3:.1f} |"
            )
            print(f"| {batch} | {name} | {extra[name] / 2**20:.1f} | {peak[name] / 2**20:.0f} | "
                  f"{per_token * 1e3:.1f} | {statistics.median(ratios):.2f}x {costs}")


# ---------------------------------------------------------------------------------------------- report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed runs of each (interleaved pairs)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", help="only the batch table, for these batch sizes")
    parser.add_argument("--breakdown", action="store_true",
                        help="only where the prefill's time goes, per part of the model, dense vs CoreMatching")
    parser.add_argument("--schemes", nargs="*", choices=BATCH_SCHEMES, default=list(BATCH_SCHEMES),
                        help="the batch table's schemes (dense is always measured)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    if args.batches:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.reps} reps, "
              f"{args.new_tokens} new tokens; {METHOD}")
        batch_table(model, args.batches, args.schemes, args.reps, args.new_tokens)
        return
    inputs = build_inputs(model)
    if args.breakdown:
        with cm.sparsify(model, METHOD) as session, torch.no_grad():
            model(**inputs, logits_to_keep=1)
            kept = len(session.last.kept_positions[0])
        prefill_breakdown(model, inputs, args.reps, kept)
        return
    methods = {"dense": None, "corematching": METHOD}
    for method in methods.values():  # warm-up, and the decision the sparse runs repeat
        run(model, method, inputs, 2)
    with cm.sparsify(model, METHOD) as session:
        model(**inputs, logits_to_keep=1)
        kept_tokens = len(session.last.kept_positions[0])
        core_width = len(session.last.core_neurons[0])

    results = {name: [] for name in methods}
    for rep in range(args.reps):
        order = list(methods) if rep % 2 == 0 else list(reversed(methods))  # alternate who goes first
        for name in order:
            gc.collect()
            results[name].append(run(model, methods[name], inputs, args.new_tokens))
    memory = {name: peak_rss(model, method, inputs, args.new_tokens) for name, method in methods.items()}
    selection_time, selection_prefill = selection_share(model, METHOD, inputs, max(3, args.reps // 2))

    # Per run: prefill, median decode step, end-to-end. Speedups are medians of the ratios within each rep's
    # pair (run back to back), which follows the shared CPU's load better than a ratio of medians.
    per_run = {
        name: [(r["prefill"], statistics.median(r["steps"]), r["end_to_end"]) for r in runs]
        for name, runs in results.items()
    }

    def median_time(name, column):
        return statistics.median(run[column] for run in per_run[name])

    def paired_ratios(column):
        return [d[column] / s[column] for d, s in zip(per_run["dense"], per_run["corematching"])]

    def paired_speedup(column):
        return statistics.median(paired_ratios(column))

    flops = {
        "dense": (prefill_flops(None), decode_flops(None, args.new_tokens, None)),
        "corematching": (prefill_flops(kept_tokens), decode_flops(kept_tokens, args.new_tokens, core_width)),
    }
    gib = 2**30

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(
        f"model: 8 layers, hidden {HIDDEN}, FFN {FFN}, {HEADS} heads / {KV_HEADS} KV heads, vocab {VOCAB}, fp32; "
        f"prompt {VISUAL} visual + {TEXT} text tokens; {args.new_tokens} new tokens; {args.reps} interleaved reps"
    )
    print(f"CoreMatching: {METHOD}")
    print(
        f"tokens after layer {PRUNE_LAYER}: {kept_tokens} of {VISUAL + TEXT}; "
        f"core neurons per layer: {core_width} of {FFN}"
    )
    print()
    print("| metric | dense (median) | CoreMatching (median) | speedup (median of paired ratios) |")
    print("|---|---:|---:|---:|")
    rows = [
        ("prefill time (s)", 0, 1, "{:.3f}"),
        ("decode time per token (ms)", 1, 1000, "{:.1f}"),
        (f"end-to-end, {args.new_tokens} new tokens (s)", 2, 1, "{:.3f}"),
    ]
    for label, column, scale, fmt in rows:
        dense, sparse = median_time("dense", column) * scale, median_time("corematching", column) * scale
        print(f"| {label} | {fmt.format(dense)} | {fmt.format(sparse)} | {paired_speedup(column):.2f}x |")
    print(
        f"| peak RSS (GiB) | {memory['dense'][1] / gib:.2f} | {memory['corematching'][1] / gib:.2f} | "
        f"{memory['dense'][1] / memory['corematching'][1]:.2f}x |"
    )
    print(
        f"| peak RSS above the loaded model (GiB) | {(memory['dense'][1] - memory['dense'][0]) / gib:.3f} | "
        f"{(memory['corematching'][1] - memory['corematching'][0]) / gib:.3f} | |"
    )
    print(f"| prefill FLOPs (GFLOP) | {flops['dense'][0] / 1e9:.1f} | {flops['corematching'][0] / 1e9:.1f} | "
          f"{flops['dense'][0] / flops['corematching'][0]:.2f}x |")
    print(f"| decode FLOPs per token (GFLOP) | {flops['dense'][1] / 1e9:.3f} | {flops['corematching'][1] / 1e9:.3f} | "
          f"{flops['dense'][1] / flops['corematching'][1]:.2f}x |")
    print()
    print("| phase | achieved speedup | FLOP bound | achieved / bound |")
    print("|---|---:|---:|---:|")
    for phase, column in [("prefill", 0), ("decode (per token)", 1)]:
        achieved = paired_speedup(column)
        bound = flops["dense"][column] / flops["corematching"][column]
        print(f"| {phase} | {achieved:.2f}x | {bound:.2f}x | {achieved / bound:.2f} |")
    print()
    print(
        f"CoreMatching's selection (token-wise and sentence-wise core neurons, scores, budgets) in a sparse prefill: "
        f"{selection_time * 1e3:.1f} ms of {selection_prefill * 1e3:.0f} ms "
        f"({selection_time / selection_prefill:.1%}; median of {max(3, args.reps // 2)} prefills)"
    )
    print()
    for label, column in [("prefill", 0), ("decode per token", 1)]:
        ratios = ", ".join(f"{r:.2f}" for r in paired_ratios(column))
        times = "; ".join(
            f"{name} " + ", ".join(f"{run[column]:.3f}" for run in per_run[name]) for name in methods
        )
        print(f"{label}: paired speedups {ratios} (times in s: {times})")


if __name__ == "__main__":
    main()
