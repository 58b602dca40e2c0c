"""Resident memory across finished conversations under one session: does it come back when a conversation ends?

A LLaVA-shaped model with random weights (Llama language model: hidden 1024, FFN 8192, 4 layers; a small CLIP
tower), fp32 on CPU, one `sparsify` session with core-neuron decoding on layers 1-3 (beta 0.5). Each conversation
is one `model.generate` call on its own prompt and image (greedy, 4 new tokens); its output and KV cache are
dropped and garbage collected before the process RSS (VmRSS) is read. What one conversation's sliced FFNs hold
is reported beside it (the gathered weights of the union of its core neurons, per layer).

    python benchmarks/conversation_memory.py                  # 6 conversations, neuron_weights="copy"
    python benchmarks/conversation_memory.py --weights in_place --conversations 6

Measured here (2-core CPU, copy): one conversation's sliced FFNs are 144 MiB. When the engine kept the slices of
the last 4 prefills, RSS above the loaded model grew +173, +317, +461, +604, +606, +606 MiB over six finished
conversations; with the slices freed with their caches it stays at +29, +27, +27, +27, +27, +27 MiB
(session.held_bytes 0 after each). In place: +27 to +78 MiB before, +28 to +44 MiB after (allocator noise; held:
0.1 MiB of swap indices).
"""

import argparse
import gc
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import corematching as cm
from corematching.runtime import engine as engine_module

IMAGE_TOKEN, IMAGE_SIZE, PATCH = 120, 24, 4
VISUAL_TOKENS = (IMAGE_SIZE // PATCH) ** 2
MIB = 2**20


def build_model() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=8192, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def conversation_inputs(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 100, (8,), generator=generator)
    prompt = torch.cat([torch.tensor([1]), text[:3], torch.full((VISUAL_TOKENS,), IMAGE_TOKEN), text[3:]])
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": prompt.unsqueeze(0), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "pixel_values": pixels}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--weights", choices=("copy", "in_place"), default="copy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model()
    method = cm.CoreMatching(prune_layer=1, token_budget=8, beta=0.5, neuron_layers=[1, 2, 3])
    slice_bytes = []  # what each conversation's sliced FFNs held, read at their creation
    gather = engine_module.SlicedFFN.gather

    def recorded_gather(*args):
        sliced = gather(*args)
        slice_bytes.append(0 if sliced is None else sliced.extra_bytes)
        return sliced

    engine_module.SlicedFFN.gather = staticmethod(recorded_gather)
    gc.collect()
    with cm.sparsify(model, method, neuron_weights=args.weights) as session, torch.no_grad():
        start = rss_bytes()
        print(f"RSS with the model loaded: {start / MIB:.0f} MiB", flush=True)
        for index in range(args.conversations):
            model.generate(**conversation_inputs(index), max_new_tokens=4, do_sample=False)
            gc.collect()
            held = getattr(session, "held_bytes", None)
            held_text = "" if held is None else f", session.held_bytes {held / MIB:.1f} MiB"
            print(f"after conversation {index + 1}: RSS +{(rss_bytes() - start) / MIB:.0f} MiB{held_text}",
                  flush=True)
    print(f"one conversation's sliced FFNs (layers 1-3): {sum(slice_bytes[:3]) / MIB:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
