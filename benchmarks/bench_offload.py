"""Dense with accelerate's disk offload against CoreMatching, on a model larger than the memory it runs in.

The model has LLaVA-1.5-7B's language model geometry (Vicuna-7B: 32 layers, hidden 4096, FFN 11008, 32 heads,
vocabulary 32064) with random weights, fp32 (25.2 GiB, 27 GB), and a smaller CLIP vision tower (hidden 256, 4 layers,
336 px / 14 px patches: the 576 visual tokens of CLIP-L/336, at a fraction of its cost; said in every record).
`--scale s` narrows hidden and FFN widths by s and `--layers n` keeps n layers, for runs that fit a small machine.

1. Generation (once): safetensors shards, one per decoder layer plus one for the rest, each written to a
   `.partial` file and renamed when complete, so an interrupted run resumes at the first missing shard and a
   partial shard never counts; the free disk is checked first. Weights are drawn per tensor from a seed derived
   from its name, so a resumed generation writes the same model.
2. Placement: `corematching.plan.plan_memory` at `--memory` gives the device map: the FFNs of the neuron layers
   (every layer after K) on disk, everything else resident. Both runs use that one loaded model: dense streams
   each offloaded FFN from disk at every forward (accelerate's hooks), CoreMatching streams them in the prefill,
   then reads its core slices once and decodes from them. Resident parameters are copied off the checkpoint's
   memory map, so that they are really resident.
3. The page cache: a machine whose memory is smaller than the model cannot keep the offloaded weights cached
   between tokens (a cyclic scan larger than the cache misses every time). A machine with more memory would, so
   by default (`--evict`) the checkpoint files are dropped from the page cache (posix_fadvise DONTNEED) before
   each run and after each forward pass, which makes every offloaded read a disk read as on the small machine;
   the time that takes is measured and left out.
4. Measured per run (batch 1, greedy, `--new-tokens` tokens, dense and each beta interleaved, `--reps` times, the
   order alternating): prefill seconds, decode seconds per token, end to end seconds, peak RSS (VmHWM, reset
   before the run), bytes read from disk (/proc/self/io read_bytes) and bytes the offload store handed out.
   Ratios are medians of the per-repetition ratios, from this one run.

    python benchmarks/bench_offload.py --dir /data/llava7b-random          # full size: 28 GB of disk, 24 GiB budget
    python benchmarks/bench_offload.py --dir /tmp/small --scale 0.125 --layers 8 --memory auto
    python benchmarks/bench_offload.py ... --placement resident            # the same, nothing offloaded
"""

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)

import corematching as cm
from corematching.plan import PlanError, format_bytes, parse_bytes, plan_memory

HIDDEN, FFN, LAYERS, HEAD_DIM, VOCAB = 4096, 11008, 32, 128, 32064
VISUAL, TEXT = 576, 40
PRUNE_LAYER, KEPT_VISUAL = 2, 64
INDEX = "model.safetensors.index.json"
DISK_MARGIN = 1 << 30  # free disk kept beyond the shards still to write


def vocabulary(scale: float) -> int:
    """LLaVA-1.5's 32064 at full size; narrower models get a proportionally smaller one, so that embeddings and
    head keep their share of the model (at least 1024 entries)."""
    return VOCAB if scale == 1 else max(1024, int(round(VOCAB * scale / 64)) * 64)


def image_token(scale: float) -> int:
    return vocabulary(scale) - 64  # 32000 at full size, as LLaVA-1.5


def model_config(scale: float, layers: int) -> LlavaConfig:
    hidden = max(HEAD_DIM, int(round(HIDDEN * scale / HEAD_DIM)) * HEAD_DIM)
    width = max(64, int(round(FFN * scale / 64)) * 64) if scale != 1 else FFN
    text = LlamaConfig(
        vocab_size=vocabulary(scale), hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=hidden // HEAD_DIM, max_position_embeddings=4096,
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336,
        patch_size=14, projection_dim=256,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token(scale), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- generation


def shard_plan(config: LlavaConfig) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """{shard file: {tensor name: (shape, dtype)}}: one shard per decoder layer, one for everything else."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    shards: dict[str, dict] = {}
    layers = config.text_config.num_hidden_layers
    for name, tensor in model.state_dict().items():
        found = re.match(r"model\.language_model\.layers\.(\d+)\.", name)
        shard = f"layer-{int(found.group(1)):03d}-of-{layers:03d}.safetensors" if found else "rest.safetensors"
        shards.setdefault(shard, {})[name] = (tuple(tensor.shape), tensor.dtype)
    return shards


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per name: norms 1, biases 0, other weights N(0, 0.02) (embeddings too)."""
    if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
        return torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % (2**63)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(0.02)


def shard_bytes(tensors: dict) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in tensors.values())


def shard_complete(path: Path, tensors: dict) -> bool:
    """A finished shard: the file exists (renamed only when complete) and holds exactly these tensors."""
    if not path.exists():
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys()) == set(tensors)
    except Exception:
        return False


def generate_model(folder: Path, config: LlavaConfig) -> None:
    """Write the random checkpoint shard by shard (resumable, atomic per shard), refusing when the disk is short."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(config)
    index_path = folder / INDEX
    if index_path.exists() and all(shard_complete(folder / shard, tensors) for shard, tensors in shards.items()):
        return
    missing = {shard: tensors for shard, tensors in shards.items() if not shard_complete(folder / shard, tensors)}
    needed = sum(shard_bytes(tensors) for tensors in missing.values())
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        sys.exit(
            f"not enough free disk in {folder}: the model still needs {format_bytes(needed)} (of "
            f"{format_bytes(sum(map(shard_bytes, shards.values())))}) plus {format_bytes(DISK_MARGIN)} of margin, "
            f"and {format_bytes(free)} is free; free some, or pass --dir on a larger disk"
        )
    for leftover in folder.glob("*.partial"):
        leftover.unlink()  # an interrupted shard: never counted, written again
    bar = tqdm(total=needed, unit="B", unit_scale=True, desc="generating the model")
    for shard, tensors in missing.items():
        values = {name: random_tensor(name, shape, dtype) for name, (shape, dtype) in tensors.items()}
        partial = folder / f"{shard}.partial"
        save_file(values, partial, metadata={"format": "pt"})
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, folder / shard)
        bar.update(shard_bytes(tensors))
        del values
    bar.close()
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    total = sum(map(shard_bytes, shards.values()))
    write_atomically(folder / "config.json", config.to_json_string())
    write_atomically(index_path, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------- measuring


class PageCache:
    """Drops the checkpoint's files from the page cache (clean pages only; nothing is written)."""

    def __init__(self, folder: Path, enabled: bool):
        self.files = sorted(folder.glob("*.safetensors")) if enabled else []
        self.spent = 0.0

    def evict(self) -> None:
        start = time.perf_counter()
        for path in self.files:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
        self.spent += time.perf_counter() - start


class StepClock(LogitsProcessor):
    """Stamps the time after every forward, then empties the page cache (its time is subtracted)."""

    def __init__(self, cache: PageCache):
        self.stamps, self.cache = [], cache

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter() - self.cache.spent)
        self.cache.evict()
        return scores


class StoreCounter:
    """Bytes accelerate's offload store hands out (each offloaded tensor brought in for a forward)."""

    def __init__(self):
        from accelerate.utils import offload

        self.bytes = 0
        original = offload.OffloadedWeightsLoader.__getitem__

        def counting(store, key):
            tensor = original(store, key)
            self.bytes += tensor.numel() * tensor.element_size()
            return tensor

        offload.OffloadedWeightsLoader.__getitem__ = counting


def disk_read_bytes() -> int:
    with open("/proc/self/io") as io:
        return int(re.search(r"read_bytes:\s+(\d+)", io.read()).group(1))


def reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


class PrefillBar:
    """A progress bar over the decoder layers of the prefill (the streamed part)."""

    def __init__(self, model, enabled: bool):
        self.layers = model.model.language_model.layers
        self.enabled, self.bar, self.handles = enabled, None, []

    def __enter__(self):
        if self.enabled:
            self.bar = tqdm(total=len(self.layers), desc="prefill", unit="layer", leave=False)

            def step(module, args):
                if self.bar is not None:
                    self.bar.update(1)
                    if self.bar.n >= self.bar.total:
                        self.bar.close()
                        self.bar = None

            self.handles = [layer.register_forward_pre_hook(step) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        if self.bar is not None:
            self.bar.close()


def build_inputs(image_token_id: int) -> dict:
    """[BOS, 5 text, 576 image, 34 text] and one random image."""
    generator = torch.Generator().manual_seed(1)
    before = torch.randint(3, image_token_id, (5,), generator=generator)
    after = torch.randint(3, image_token_id, (TEXT - 6,), generator=generator)
    input_ids = torch.cat([torch.tensor([1]), before, torch.full((VISUAL,), image_token_id), after]).unsqueeze(0)
    return {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 336, 336, generator=generator)}


def run_once(model, method, inputs, new_tokens, cache: PageCache, store: StoreCounter, bars: bool) -> dict:
    cache.evict()
    cache.spent = 0.0
    clock = StepClock(cache)
    measures_peak = reset_peak_rss()
    read_before, store_before = disk_read_bytes(), store.bytes
    session = cm.sparsify(model, method) if method is not None else None
    try:
        with torch.no_grad(), PrefillBar(model, bars):
            start = time.perf_counter()
            model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock])
            )
            end = time.perf_counter() - cache.spent
        record = session.last if session is not None else None
    finally:
        if session is not None:
            session.remove()
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {
        "prefill_s": clock.stamps[0] - start,
        "decode_s_per_token": statistics.mean(steps) if steps else None,
        "end_to_end_s": end - start,
        "peak_rss_bytes": peak_rss() if measures_peak else None,
        "disk_read_bytes": disk_read_bytes() - read_before,
        "store_bytes": store.bytes - store_before,
        "resident_slice_bytes": getattr(record, "resident_slice_bytes", None),
        "slice_bytes_read": getattr(record, "slice_bytes_read", None),
    }


def load(folder: Path, device_map: dict, offload_folder: Path) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=offload_folder, dtype=torch.float32
    )
    for parameter in model.parameters():  # resident weights off the checkpoint's memory map, into process memory
        if parameter.device.type != "meta":
            parameter.data = parameter.data.clone()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where the model is (generated there when absent)")
    parser.add_argument("--scale", type=float, default=1.0, help="hidden and FFN widths times this")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument(
        "--memory",
        default="24GiB",
        help="the budget planned for, or 'auto': the smallest that keeps beta with FFNs offloaded",
    )
    parser.add_argument("--placement", choices=["offload", "resident"], default="offload")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.4, 0.2])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-evict", dest="evict", action="store_false", help="leave the page cache alone")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars for the prefill")
    args = parser.parse_args()
    if not 0 < args.scale <= 1 or args.layers < PRUNE_LAYER + 2:
        parser.error(f"--scale must be in (0, 1] and --layers at least {PRUNE_LAYER + 2}")
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    config = model_config(args.scale, args.layers)
    generate_model(args.dir, config)
    if args.generate_only:
        return
    neuron_layers = list(range(PRUNE_LAYER + 1, args.layers))
    methods = {f"beta {beta}": cm.CoreMatching(prune_layer=PRUNE_LAYER, token_budget=KEPT_VISUAL, beta=beta,
                                               neuron_layers=neuron_layers) for beta in args.betas}  # fmt: skip
    first = next(iter(methods.values()))
    planning = dict(text_tokens=TEXT, visual_tokens=VISUAL, answer_tokens=args.new_tokens)
    model_bytes = json.loads((args.dir / INDEX).read_text())["metadata"]["total_size"]
    memory = auto_budget(config, first, planning) if args.memory == "auto" else parse_bytes(args.memory)
    if args.placement == "resident":
        device_map, planned = {"": "cpu"}, None
    else:
        try:
            planned = plan_memory(config, memory, "float32", first, **planning)
        except PlanError as error:
            sys.exit(f"--memory {args.memory}: {error}")
        if not planned.offload:
            sys.exit(f"the model ({format_bytes(model_bytes)}) fits in {format_bytes(memory)}: nothing to offload; "
                     "pass a smaller --memory, or --placement resident")  # fmt: skip
        device_map = planned.device_map
        print(planned.explain())
    store = StoreCounter()
    model = load(args.dir, device_map, args.dir.with_name(args.dir.name + "-offload"))
    inputs = build_inputs(config.image_token_id)
    cache = PageCache(args.dir, args.evict and args.placement == "offload")
    runs = {"dense": None, **methods}
    records = {name: [] for name in runs}
    order = list(runs)
    for rep in tqdm(range(args.reps), desc="repetitions"):
        for name in order if rep % 2 == 0 else order[::-1]:
            records[name].append(run_once(model, runs[name], inputs, args.new_tokens, cache, store, not args.quiet))
    summary = summarize(records)
    report = {
        "geometry": {"hidden": config.text_config.hidden_size, "ffn": config.text_config.intermediate_size,
                     "layers": args.layers, "vocab": config.text_config.vocab_size, "scale": args.scale,
                     "vision": "CLIP hidden 256, 4 layers, 336/14 (576 tokens): smaller than CLIP-L/336"},
        "model_bytes": model_bytes, "memory_budget": memory, "placement": args.placement,
        "planned_total": planned.total if planned else None, "evict_page_cache": cache.files != [],
        "prompt": {"visual": VISUAL, "text": TEXT, "kept_visual": KEPT_VISUAL, "prune_layer": PRUNE_LAYER,
                   "neuron_layers": f"{PRUNE_LAYER + 1}-{args.layers - 1}", "new_tokens": args.new_tokens},
        "threads": torch.get_num_threads(), "reps": args.reps, "summary": summary, "runs": records,
    }  # fmt: skip
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def auto_budget(config, method, planning: dict) -> int:
    """The smallest budget (to the MiB) the plan fills with the method's beta and neuron layers, FFN originals
    offloaded: below what the dense model needs, so that offload happens."""
    dense = plan_memory(config, 1 << 50, "float32", method, **planning).dense_bytes
    try:
        planned = plan_memory(config, dense - 1, "float32", method, **planning)
    except PlanError as error:
        sys.exit(f"--memory auto: {error}")
    if planned.beta != method.beta or list(planned.neuron_layers) != method.neuron_layers:
        sys.exit("--memory auto: no budget below the dense model's keeps the method's beta; pass --memory")
    return -(-planned.total // (1 << 20)) * (1 << 20)


def summarize(records: dict[str, list[dict]]) -> dict:
    """Medians per run kind, and each sparse kind's speedups: medians of the per-repetition ratios to dense."""
    summary = {}
    dense = records["dense"]
    for name, runs in records.items():
        row = {key: statistics.median(r[key] for r in runs) for key in runs[0] if runs[0][key] is not None}
        if name != "dense":
            for key in ("prefill_s", "decode_s_per_token", "end_to_end_s"):
                row[f"{key}_speedup"] = statistics.median(d[key] / r[key] for d, r in zip(dense, runs))
        summary[name] = row
    return summary


def print_table(report: dict) -> None:
    geometry = report["geometry"]
    print(f"\nhidden {geometry['hidden']}, FFN {geometry['ffn']}, {geometry['layers']} layers; model "
          f"{format_bytes(report['model_bytes'])}, budget {format_bytes(report['memory_budget'])}, "
          f"{report['placement']}, {report['threads']} threads, {report['reps']} reps")  # fmt: skip
    header = f"{'':<10}{'prefill s':>10}{'decode s/tok':>13}{'e2e s':>9}{'decode x':>9}{'e2e x':>7}"
    header += f"{'peak RSS':>12}{'disk read':>12}{'store read':>12}{'slices':>11}{'slices read':>12}"
    print(header)
    for name, row in report["summary"].items():
        peak = format_bytes(int(row["peak_rss_bytes"])) if "peak_rss_bytes" in row else "-"
        slices = format_bytes(int(row["resident_slice_bytes"])) if "resident_slice_bytes" in row else "-"
        slices_read = format_bytes(int(row["slice_bytes_read"])) if "slice_bytes_read" in row else "-"
        print(f"{name:<10}{row['prefill_s']:>10.2f}{row['decode_s_per_token']:>13.4f}{row['end_to_end_s']:>9.2f}"
              f"{row.get('decode_s_per_token_speedup', 1):>9.2f}{row.get('end_to_end_s_speedup', 1):>7.2f}"
              f"{peak:>12}{format_bytes(int(row['disk_read_bytes'])):>12}{format_bytes(int(row['store_bytes'])):>12}"
              f"{slices:>11}{slices_read:>12}")  # fmt: skip


if __name__ == "__main__":
    main()
