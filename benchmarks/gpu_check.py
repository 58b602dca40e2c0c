"""Checks and timings that need a GPU, in one run with random weights (nothing is downloaded):

  1. batch invariance in bf16: three prompts of different lengths answered alone and in one left-padded batch
     under CoreMatching (64 of 576 tokens, core neurons on every layer after K): same tokens? largest logit gap?
  2. in-place neuron order on the device: `neuron_weights="in_place"` against `"copy"` (same tokens and logits),
     and the FFN weights bit for bit the same after the session;
  3. timing at real size: LLaVA-1.5-7B's geometry (CLIP ViT-L/14 at 336 px, 576 visual tokens; Llama-2-7B: 32
     layers, 4096 wide, FFN 11008) in bf16 with sdpa, batch 1: dense, CoreMatching with token pruning alone (64
     of 576 tokens) and with core neurons on every layer after K: prefill time, decode time per token, end to end
     for a 32-token answer, torch.cuda.max_memory_allocated.
One markdown table per part, printed and written to --output (with the device named).

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.md      # on a GPU (~3 minutes)
    python benchmarks/gpu_check.py --tiny --device cpu --output /tmp/check.md    # the same code, tiny widths

--tiny keeps the geometry (336 px, patch 14, 576 visual tokens) but makes every width and depth tiny, so that
the whole script runs on a CPU in seconds (tests/test_bench.py runs it so).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import corematching as cm
from corematching import bench

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
         lambda: check_batch_invariance(model, device, dtype, 8)),
        ("In-place neuron order (8 tokens, batch of 2)", lambda: check_in_place(model, device, dtype, 8)),
        (f"Timing, batch 1, median of {args.reps}", lambda: timing(model, device, dtype, args.new_tokens, args.reps)),
    ):
        part_started = time.perf_counter()
        table = run()
        sections.append(f"## {title}\n\n{table}\n\n({time.perf_counter() - part_started:.0f} s)\n")
        print(sections[-1], flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(sections))
    print(f"tables: {output} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
