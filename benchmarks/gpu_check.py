"""Checks and timings that need a GPU, in one run with random weights (nothing is downloaded):

  1. batch invariance in bf16: three prompts of different lengths answered alone and in one left-padded batch
     under CoreMatching (64 of 576 tokens, core neurons on every layer after K): same tokens? largest logit gap?
  2. in-place neuron order on the device: `neuron_weights="in_place"` against `"copy"` (same tokens and logits),
     and the FFN weights bit for bit the same after the session;
  3. timing at real size: LLaVA-1.5-7B's geometry (CLIP ViT-L/14 at 336 px, 576 visual tokens; Llama-2-7B: 32
     layers, 4096 wide, FFN 11008) in bf16 with sdpa, batch 1: dense, CoreMatching with token pruning alone (64
     of 576 tokens) and with core neurons on every layer after K: prefill time, decode time per token, end to end
     for a 32-token answer, torch.cuda.max_memory_allocated.
  4. FFN originals offloaded (the paper's setting: a 12 GB Titan Xp, smaller than the model): LLaVA-1.5-7B's
     language model geometry with bench_offload.py's smaller vision tower, bf16, random weights drawn parameter by
     parameter; corematching's plan at a 12 GiB budget puts the FFNs of layers 3-31 in pinned CPU memory behind
     accelerate's offload hooks and everything else on the GPU. Dense (every offloaded FFN copied in at every
     forward) against CoreMatching (64 of 576 tokens, core neurons after K at beta 0.4 and 0.2: slices read once
     per prefill, decoding from them on the GPU), batch 1, interleaved: prefill, decode per token, end to end,
     max_memory_allocated, bytes copied host->device; ratios from the one run (--skip-offload leaves it out).
One markdown table per part, printed and written to --output (with the device named).

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.md      # on a GPU (~5 minutes)
    python benchmarks/gpu_check.py --tiny --device cpu --output /tmp/check.md    # the same code, tiny widths

--tiny keeps the geometry (336 px, patch 14, 576 visual tokens) but makes every width and depth tiny, so that
the whole script runs on a CPU in seconds (tests/test_bench.py runs it so).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import OffloadedWeightsLoader

import corematching as cm
from corematching.apps import bench
from corematching.plan import format_bytes, plan_memory

IMAGE_TOKEN, PAD, BOS = 32000, 32001, 1
VISUAL_TOKENS = 576  # 336 px / patch 14 = 24 x 24
BUDGET = 64


def llava_config(tiny: bool):
    """LLaVA-1.5-7B's configuration (llava-hf/llava-1.5-7b-hf), or the same geometry with tiny widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **vision),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS,
                                eos_token_id=2, **text),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=VISUAL_TOKENS,
    )


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(tiny), attn_implementation="sdpa",
                                                           dtype=dtype)
    model.generation_config.eos_token_id = None  # every answer is exactly max_new_tokens long
    model.generation_config.pad_token_id = PAD
    return model.eval()


def prompt(text_before: int, text_after: int, seed: int) -> torch.Tensor:
    """[BOS, text, 576 image tokens, text] like LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" prompts."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 32000, (text_before,), generator=generator)
    after = torch.randint(3, 32000, (text_after,), generator=generator)
    return torch.cat([torch.tensor([BOS]), before, torch.full((VISUAL_TOKENS,), IMAGE_TOKEN), after])


def batch_inputs(prompts: list[torch.Tensor], seeds: list[int], device, dtype) -> dict:
    """Left-padded input_ids and attention_mask, one random 336 px image per prompt."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    pixels = torch.stack([torch.randn(3, 336, 336, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "pixel_values": pixels.to(device, dtype)}


def methods(num_layers: int) -> dict:
    prune_layer = cm.CoreMatching().prune_layer
    return {
        "dense": cm.Dense(),
        f"CoreMatching {BUDGET}/{VISUAL_TOKENS} tokens": cm.CoreMatching(token_budget=BUDGET),
        f"CoreMatching {BUDGET}/{VISUAL_TOKENS} tokens + core neurons after K": cm.CoreMatching(
            token_budget=BUDGET, neuron_layers=list(range(prune_layer + 1, num_layers))),
    }


@torch.no_grad()
def generate(model, method, inputs: dict, new_tokens: int, **session_options):
    """(tokens [B, new_tokens], scores [B, new_tokens, V] in fp32) of a greedy run under `method`."""
    with cm.sparsify(model, method, **session_options):
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    return out.sequences[:, length:], torch.stack(out.scores, 1).float()


# ---------------------------------------------------------------------------------------------- the checks


def check_batch_invariance(model, device, dtype, new_tokens: int) -> str:
    method = list(methods(model.config.text_config.num_hidden_layers).values())[2]
    shapes = [(5, 20, 11), (30, 8, 12), (12, 40, 13)]  # text before / after the image, seed
    prompts = [prompt(before, after, seed) for before, after, seed in shapes]
    seeds = [seed for _, _, seed in shapes]
    together = generate(model, method, batch_inputs(prompts, seeds, device, dtype), new_tokens)
    lines = ["| prompt | tokens | same tokens alone and in the batch | largest logit gap |", "|---|---:|---|---:|"]
    for row, (ids, seed) in enumerate(zip(prompts, seeds)):
        alone = generate(model, method, batch_inputs([ids], [seed], device, dtype), new_tokens)
        same = torch.equal(alone[0][0], together[0][row])
        # compare scores up to the first differing token (after it the prompts differ)
        steps = new_tokens if same else int((alone[0][0] != together[0][row]).nonzero()[0]) + 1
        gap = (alone[1][0, :steps] - together[1][row, :steps]).abs().max().item()
        lines.append(f"| {row} | {len(ids)} | {'yes' if same else 'no'} | {gap:.4g} |")
    return "\n".join(lines)


def check_in_place(model, device, dtype, new_tokens: int) -> str:
    num_layers = model.config.text_config.num_hidden_layers
    method = list(methods(num_layers).values())[2]
    inputs = batch_inputs([prompt(5, 20, 21), prompt(9, 12, 22)], [21, 22], device, dtype)
    layer = model.model.language_model.layers[method.neuron_layers[0]].mlp
    before = [p.detach().clone() for p in layer.parameters()]
    copy = generate(model, method, inputs, new_tokens)
    in_place = generate(model, method, inputs, new_tokens, neuron_weights="in_place")
    restored = all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    same = torch.equal(copy[0], in_place[0])
    gap = (copy[1] - in_place[1]).abs().max().item()
    return ("| check | result |\n|---|---|\n"
            f"| same tokens, in place and copy | {'yes' if same else 'no'} |\n"
            f"| largest logit gap | {gap:.4g} |\n"
            f"| FFN weights bit for bit the same after the session | {'yes' if restored else 'no'} |")


def timing(model, device, dtype, new_tokens: int, reps: int) -> str:
    inputs = batch_inputs([prompt(5, 30, 31)], [31], device, dtype)
    lines = ["| method | visual tokens kept | prefill ms | decode ms/token | end-to-end ms "
             f"({new_tokens} tokens) | max_memory_allocated MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, method in methods(model.config.text_config.num_hidden_layers).items():
        bench.timed_generate(model, method, inputs, new_tokens)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for _ in range(reps):
            times, record = bench.timed_generate(model, method, inputs, new_tokens)
            runs.append(times)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
        kept = len(record.kept_visual_positions[0]) if record.prune_layer is not None else VISUAL_TOKENS
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        lines.append(f"| {name} | {kept}/{VISUAL_TOKENS} | {1e3 * median['prefill']:.1f} "
                     f"| {1e3 * median['decode_per_token']:.2f} | {1e3 * median['end_to_end']:.0f} | {peak} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- offloaded FFNs

OFFLOAD_BUDGET = "12GiB"  # the paper's Titan Xp
OFFLOAD_BETAS = (0.4, 0.2)
TINY_OFFLOAD = dict(scale=1 / 32, layers=10)  # hidden 128, FFN 320, vocabulary 1024; the same 576 visual tokens


def bench_offload_module():
    """benchmarks/bench_offload.py (its model geometry, prompt and summary of ratios), loaded from beside this file."""
    path = Path(__file__).with_name("bench_offload.py")
    spec = importlib.util.spec_from_file_location("bench_offload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingStore(OffloadedWeightsLoader):
    """accelerate's in-memory offload store, counting the bytes its hooks take out (each one copied to the device)."""

    def __init__(self, state_dict: dict):
        super().__init__(state_dict=state_dict)
        self.bytes = 0

    def __getitem__(self, key: str):
        tensor = super().__getitem__(key)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor


def offload_plan(config, device, dtype, method, planning: dict, tiny: bool):
    """The plan at 12 GiB (the GPU), or (--tiny) at the smallest budget that keeps the method's beta with FFN
    originals offloaded, so that offload really happens at tiny widths."""
    dtype_name = str(dtype).replace("torch.", "")
    budget = OFFLOAD_BUDGET
    if tiny:
        dense = plan_memory(config, 1 << 50, dtype_name, method, device=device.type, **planning).dense_bytes
        budget = dense - 1
    planned = plan_memory(config, budget, dtype_name, method, device=device.type, **planning)
    if not planned.offload or planned.beta != method.beta or list(planned.neuron_layers) != method.neuron_layers:
        raise SystemExit(f"gpu_check: the plan at {format_bytes(planned.budget)} is not FFNs of layers "
                         f"{method.neuron_layers[0]}-{method.neuron_layers[-1]} offloaded at beta {method.beta}:\n"
                         + planned.explain())  # fmt: skip
    return planned


def build_offloaded_model(config, device, dtype, planned):
    """The model with random weights, built parameter by parameter (nothing whole anywhere): everything on `device`
    but the planned FFN originals, which go to CPU memory (pinned on an accelerator) behind accelerate's offload
    hooks, as `dispatch_model` places them. Weights are drawn on `device` (fast on a GPU) with bench_offload's
    rule (norms 1, biases 0, other weights N(0, 0.02))."""
    from accelerate import init_empty_weights
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) computed as usual
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    offloaded = {name for name, place in planned.device_map.items() if place != device.type}
    pin = device.type == "cuda"
    generator = torch.Generator(device).manual_seed(0)
    host = {}
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
            value = torch.ones(parameter.shape, dtype=dtype, device=device)
        elif name.endswith("bias"):
            value = torch.zeros(parameter.shape, dtype=dtype, device=device)
        else:
            value = torch.randn(parameter.shape, generator=generator, dtype=dtype, device=device).mul_(0.02)
        if any(name.startswith(module + ".") for module in offloaded):
            host[name] = torch.empty(parameter.shape, dtype=dtype, pin_memory=pin).copy_(value)
            set_module_tensor_to_device(model, name, "meta")
        else:
            set_module_tensor_to_device(model, name, device, value=value)
        del value
    for name, buffer in model.named_buffers():
        set_module_tensor_to_device(model, name, device, value=buffer)
    store = CountingStore(host)
    attach_align_device_hook_on_blocks(
        model, execution_device={name: device for name in planned.device_map},
        offload={name: name in offloaded for name in planned.device_map}, weights_map=store,
    )  # fmt: skip
    model.generation_config.eos_token_id = None  # every answer is exactly max_new_tokens long
    model.generation_config.pad_token_id = 0
    return model.eval(), store, sum(t.numel() * t.element_size() for t in host.values())


class SyncedClock(bench.StepClock):
    """bench's step clock, waiting for the device before each stamp."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        return super().__call__(input_ids, scores)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def offloaded_run(model, method, inputs: dict, new_tokens: int, store: CountingStore, device) -> dict:
    from transformers import LogitsProcessorList

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    streamed_before = store.bytes
    clock = SyncedClock(device)
    with cm.sparsify(model, method) as session:
        synchronize(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
        synchronize(device)
        end = time.perf_counter()
        record = session.last
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    slices_read = getattr(record, "slice_bytes_read", None) or 0
    return {
        "prefill_s": clock.stamps[0] - start,
        "decode_s_per_token": statistics.mean(steps),
        "end_to_end_s": end - start,
        "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "streamed_bytes": store.bytes - streamed_before,  # FFN originals copied in by accelerate's hooks
        "slice_bytes_read": slices_read,  # core slices copied from the same store
        "host_to_device_bytes": store.bytes - streamed_before + slices_read,
        "resident_slice_bytes": getattr(record, "resident_slice_bytes", None) or 0,
    }


def offload_timing(tiny: bool, device, dtype, new_tokens: int, reps: int) -> str:
    """Dense offloaded against CoreMatching at beta 0.4 and 0.2, interleaved, ratios from this one run."""
    offload_bench = bench_offload_module()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the hooks' execution device, by index
    shape = TINY_OFFLOAD if tiny else dict(scale=1.0, layers=offload_bench.LAYERS)
    config = offload_bench.model_config(**shape)
    prune_layer, layers = offload_bench.PRUNE_LAYER, shape["layers"]
    sparse = {f"CoreMatching, beta {beta}": cm.CoreMatching(
        prune_layer=prune_layer, token_budget=offload_bench.KEPT_VISUAL, beta=beta,
        neuron_layers=list(range(prune_layer + 1, layers))) for beta in OFFLOAD_BETAS}  # fmt: skip
    planning = dict(text_tokens=offload_bench.TEXT, visual_tokens=offload_bench.VISUAL, answer_tokens=new_tokens)
    planned = offload_plan(config, device, dtype, next(iter(sparse.values())), planning, tiny)
    started = time.perf_counter()
    model, store, offloaded_bytes = build_offloaded_model(config, device, dtype, planned)
    built = time.perf_counter() - started
    inputs = {key: value.to(device) for key, value in offload_bench.build_inputs(config.image_token_id).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    runs = {"dense (offloaded)": cm.Dense(), **sparse}
    for method in runs.values():
        offloaded_run(model, method, inputs, 2, store, device)  # warm-up
    records = {name: [] for name in runs}
    order = list(runs)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            records[name].append(offloaded_run(model, runs[name], inputs, new_tokens, store, device))
    summary = offload_bench.summarize({"dense": records.pop("dense (offloaded)"), **records})
    text = config.text_config
    lines = [
        f"{'LLaVA-1.5-7B geometry at tiny widths' if tiny else 'Vicuna-7B geometry'} "
        f"({text.num_hidden_layers} layers, hidden {text.hidden_size}, FFN "
        f"{text.intermediate_size}, vocabulary {text.vocab_size}) with bench_offload's smaller vision tower (CLIP "
        "hidden 256, 4 layers, 336 px / 14: 576 visual tokens, not CLIP-L/336); K = 2, 64 of 576 visual tokens "
        f"kept, core neurons on layers {prune_layer + 1}-{layers - 1}. Budget {format_bytes(planned.budget)} "
        f"({'the smallest that offloads, --tiny' if tiny else 'max_memory of a 12 GB Titan Xp'}): "
        f"{format_bytes(offloaded_bytes)} of FFN originals in CPU memory"
        f"{' (pinned)' if device.type == 'cuda' else ''}, the rest on the device; built in {built:.0f} s. Batch 1, "
        f"{new_tokens} new tokens, {reps} repetitions interleaved (order reversed every other); times are medians, "
        "speedups medians of the per-repetition ratios; host->device is weights only (FFN originals streamed by "
        "the hooks + core slices read).",
        "",
        "| run | prefill s | decode s/token | end to end s | decode x | end to end x | max_memory_allocated "
        "| host->device | FFN originals streamed | slices resident |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        peak = format_bytes(int(row["max_memory_allocated"])) if "max_memory_allocated" in row else "-"
        lines.append(
            f"| {'dense (offloaded)' if name == 'dense' else name} | {row['prefill_s']:.3f} "
            f"| {row['decode_s_per_token']:.4f} | {row['end_to_end_s']:.2f} "
            f"| {row.get('decode_s_per_token_speedup', 1):.2f} | {row.get('end_to_end_s_speedup', 1):.2f} | {peak} "
            f"| {format_bytes(int(row['host_to_device_bytes']))} | {format_bytes(int(row['streamed_bytes']))} "
            f"| {format_bytes(int(row['resident_slice_bytes'])) if row['resident_slice_bytes'] else '-'} |"
        )  # fmt: skip
    if device.type == "cuda":
        peak = max(row["max_memory_allocated"] for row in summary.values())
        lines += ["", f"Largest max_memory_allocated {format_bytes(int(peak))}: "
                  f"{'within' if peak <= planned.budget else 'ABOVE'} the budget of {format_bytes(planned.budget)}."]
    del model, store
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths (the real geometry), fp32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", required=True, help="markdown file for the tables")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--offload-reps", type=int, default=2, help="repetitions of the offloaded comparison")
    parser.add_argument("--skip-offload", action="store_true", help="leave out the offloaded comparison")
    parser.add_argument("--note", default="", help="a line for the file's header (gpu_check.sh: the CUDA tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --tiny --device cpu to run the checks on the CPU)")
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    started = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    size = "tiny widths" if args.tiny else "LLaVA-1.5-7B size"
    header = (f"# GPU check: {device_name(device)}\n\nLLaVA-1.5-7B geometry (336 px, patch 14, 576 visual tokens), "
              f"{size}, random weights, {str(dtype).replace('torch.', '')}, sdpa; torch {torch.__version__}; "
              f"built in {time.perf_counter() - started:.0f} s.\n" + (f"\n{args.note}\n" if args.note else ""))
    sections = [header]
    for title, run in (
        ("Batch invariance (CoreMatching, core neurons after K; 8 tokens)",
         lambda built: check_batch_invariance(built, device, dtype, 8)),
        ("In-place neuron order (8 tokens, batch of 2)", lambda built: check_in_place(built, device, dtype, 8)),
        (f"Timing, batch 1, median of {args.reps}",
         lambda built: timing(built, device, dtype, args.new_tokens, args.reps)),
    ):
        part_started = time.perf_counter()
        table = run(model)
        sections.append(f"## {title}\n\n{table}\n\n({time.perf_counter() - part_started:.0f} s)\n")
        print(sections[-1], flush=True)
    del model  # the offloaded model below is built on its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_offload:
        part_started = time.perf_counter()
        table = offload_timing(args.tiny, device, dtype, args.new_tokens, args.offload_reps)
        sections.append(f"## FFN originals offloaded to CPU memory, core slices on the device\n\n{table}\n\n"
                        f"({time.perf_counter() - part_started:.0f} s)\n")
        print(sections[-1], flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(sections))
    print(f"tables: {output} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
