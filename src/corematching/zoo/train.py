"""Training recipe of the bundled VLMs (one command: `python -m corematching.zoo.train --model NAME`).

`evqa-smollm2` (the default) trains LLaVA style on the easy-vqa train split, seeded and resumable:

1. *Tower warm-up* (about a minute): the CLIP-style vision tower learns to tell the shape and the colour
   (labels read off the training questions) through two throw-away linear heads on its mean patch token.
2. *Alignment*: the projector, the tower and rank-8 LoRA adapters on every linear layer of SmolLM2 are
   trained with the answer-token loss, each question weighing the same (mean over its answer tokens and
   <|im_end|>). Open questions (what colour / what shape) are rare in easy-vqa and the slowest to learn, so
   every image whose labels are known gets one more of each, from easy-vqa's own templates. All questions of an
   image share one sequence: the image prefix comes once and each question/answer block sees only the prefix
   and itself (a block-diagonal 4-D attention mask; every block restarts at the position right after the
   image), so each block computes exactly what the single-question prompt computes, at a third of the cost.
   Logits are only formed at the answer positions.

`scenes-smollm2` trains the same way on procedural multi-object scenes (`zoo/scenes.py`), with three changes:
the tower warm-up is per patch (each patch token learns which colour and which shape cover its patch, whether
an object's centre lies in it, and its row and column), so that the visual tokens carry local content that the
language model can count and relate; a projector stage then maps each patch token to the sum of the language
model's embeddings of its colour and shape words; and every step draws fresh training scenes
(scene(TRAIN_SEED, i), about eight questions each, every question kind), so no scene is seen twice.

Checkpoints go to `runs/<name>/` every few steps; rerunning the command resumes. The trained tensors are
written to `zoo/weights/<name>.safetensors` with a JSON record of the run (for scenes-smollm2 also at every
held-out check, so that an interrupted run leaves its latest weights).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from . import build, data, scenes

# ----------------------------------------------------------------------------- data


def load_pixels(processor, split: str) -> dict[int, torch.Tensor]:
    paths = data.image_paths(split)
    ids = sorted(paths)
    images = [Image.open(paths[i]).convert("RGB") for i in ids]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {i: pixels[k] for k, i in enumerate(ids)}


def tokenize_blocks(processor, items, n_visual: int = build.N_VISUAL) -> tuple[list[int], list[tuple[list[int], int]]]:
    """Token ids of the shared image prefix, and per question (block ids, number of prompt tokens in it).

    Each block is the single-question prompt after the prefix, followed by the answer and <|im_end|>; it is
    cut from the tokenization of the full text so that it matches what the processor produces at inference.
    """
    tokenizer = processor.tokenizer
    prefix_text = "<|im_start|>user\n" + build.IMAGE_TOKEN * n_visual + "\n"
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    blocks = []
    for q in items:
        prompt = prefix_text + q.question + "<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + q.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert prompt_ids[: len(prefix)] == prefix and full_ids[: len(prompt_ids)] == prompt_ids
        blocks.append((full_ids[len(prefix) :], len(prompt_ids) - len(prefix)))
    return prefix, blocks


@dataclass
class Targets:
    """The answer tokens of a packed batch: where they are predicted and which question they belong to."""

    rows: torch.Tensor  # [N] sequence of the target
    cols: torch.Tensor  # [N] position whose output predicts the target
    labels: torch.Tensor  # [N] target token ids
    question: torch.Tensor  # [N] running index of the question (0..Q-1)


def pack(prefix: list[int], per_image_blocks: list[list[tuple[list[int], int]]], pad_id: int):
    """Pack images' question blocks into sequences with a block-diagonal mask.

    Returns input_ids [B, L], position_ids [B, L], additive mask [B, 1, L, L] and the answer targets.
    """
    lengths = [len(prefix) + sum(len(b) for b, _ in blocks) for blocks in per_image_blocks]
    batch, length = len(per_image_blocks), max(lengths)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    block_of = torch.full((batch, length), -1, dtype=torch.long)  # 0 = prefix, j+1 = block j, -1 = pad
    rows, cols, labels, question_of, n_questions = [], [], [], [], 0
    for b, blocks in enumerate(per_image_blocks):
        input_ids[b, : len(prefix)] = torch.tensor(prefix)
        position_ids[b, : len(prefix)] = torch.arange(len(prefix))
        block_of[b, : len(prefix)] = 0
        start = len(prefix)
        for j, (ids, n_prompt) in enumerate(blocks):
            end = start + len(ids)
            input_ids[b, start:end] = torch.tensor(ids)
            position_ids[b, start:end] = torch.arange(len(prefix), len(prefix) + len(ids))
            block_of[b, start:end] = j + 1
            for t in range(start + n_prompt - 1, end - 1):  # position t predicts token t + 1
                rows.append(b)
                cols.append(t)
                labels.append(ids[t + 1 - start])
                question_of.append(n_questions)
            n_questions += 1
            start = end
    query_block, key_block = block_of[:, :, None], block_of[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & ((key_block == 0) | (key_block == query_block))
    allowed |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    mask = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    targets = Targets(torch.tensor(rows), torch.tensor(cols), torch.tensor(labels), torch.tensor(question_of))
    return input_ids, position_ids, mask, targets


# ----------------------------------------------------------------------------- model parts


class LoRA(torch.nn.Module):
    """Low-rank adapters added to a model's linear layers by forward hooks (names stay the model's own)."""

    def __init__(self, model: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names, self.hooks = [], []
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        for name, module in model.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                full = f"model.language_model.{name}"
                a = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
                self.a.append(torch.nn.Parameter(a))
                self.b.append(torch.nn.Parameter(torch.zeros(module.out_features, rank)))
                self.names.append(full)
                self.hooks.append(module.register_forward_hook(self._hook(len(self.names) - 1)))

    def _hook(self, k: int):
        def add_update(module, inputs, output):
            scale = build.LORA_ALPHA / build.LORA_RANK
            return output + scale * (inputs[0] @ self.a[k].T) @ self.b[k].T

        return add_update

    def export(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.a, self.b):
            out[f"lora.{name}.A"] = a.detach().clone()
            out[f"lora.{name}.B"] = b.detach().clone()
        return out


def trained_state(model, lora: LoRA) -> dict[str, torch.Tensor]:
    state = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    state.update(lora.export())
    return {k: v.contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------- stages


def warm_up_tower(model, pixels: dict[int, torch.Tensor], train_items, steps: int, seed: int, log) -> float:
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    shape_head = torch.nn.Linear(width, len(data.SHAPES))
    color_head = torch.nn.Linear(width, len(data.COLORS))
    params = list(tower.parameters()) + list(shape_head.parameters()) + list(color_head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    grouped = data.by_image(train_items)
    ids, shape_labels, color_labels = [], [], []
    for image_id, items in grouped.items():
        shape, color = data.shape_and_color(items)
        ids.append(image_id)
        shape_labels.append(data.SHAPES.index(shape) if shape else -100)
        color_labels.append(data.COLORS.index(color) if color else -100)
    shape_labels, color_labels = torch.tensor(shape_labels), torch.tensor(color_labels)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    correct = total = 0
    for step in range(steps):
        pick = torch.randint(len(ids), (64,), generator=generator)
        batch = torch.stack([pixels[ids[i]] for i in pick])
        features = tower(batch).last_hidden_state[:, 1:].mean(1)
        shape_logits, color_logits = shape_head(features), color_head(features)
        loss = F.cross_entropy(shape_logits, shape_labels[pick], ignore_index=-100) + F.cross_entropy(
            color_logits, color_labels[pick], ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 20:  # accuracy over the last batches
            for logits, labels in ((shape_logits, shape_labels[pick]), (color_logits, color_labels[pick])):
                known = labels >= 0
                correct += (logits.argmax(-1)[known] == labels[known]).sum().item()
                total += known.sum().item()
        if step % 50 == 0:
            log(f"tower warm-up step {step}/{steps} loss {loss.item():.3f}")
    tower.eval()
    return correct / max(total, 1)


# ----------------------------------------------------------------------------- scenes-smollm2


def patch_labels(scene: scenes.Scene, grid: int, min_cover: float = 0.15) -> dict[str, torch.Tensor]:
    """Per-patch targets of one scene, each [grid * grid] (row-major, like the visual tokens).

    colour / shape: of the object covering most of the patch if it covers at least `min_cover` of it, else the
    extra class "none"; centre: 1 where an object's centre lies in the patch (objects are at least 16 pixels
    apart centre to centre along some axis, so a patch holds at most one centre).
    """
    size = scenes.IMAGE_SIZE // grid
    object_map = torch.from_numpy(scene.object_map.astype("int64"))  # [H, W], -1 background
    n_objects = len(scene.objects)
    one_hot = F.one_hot(object_map + 1, n_objects + 1)[..., 1:].float()  # [H, W, objects]
    cover = one_hot.reshape(grid, size, grid, size, n_objects).mean(dim=(1, 3)).reshape(grid * grid, n_objects)
    best_cover, best = cover.max(-1) if n_objects else (torch.zeros(grid * grid), torch.zeros(grid * grid).long())
    colour = torch.tensor([scenes.COLORS.index(o.color) for o in scene.objects])[best]
    shape = torch.tensor([scenes.SHAPES.index(o.shape) for o in scene.objects])[best]
    empty = best_cover < min_cover
    colour[empty], shape[empty] = len(scenes.COLORS), len(scenes.SHAPES)
    centre = torch.zeros(grid * grid, dtype=torch.long)
    for o in scene.objects:
        cx, cy = o.center
        centre[int(cy // size) * grid + int(cx // size)] = 1
    return {"colour": colour, "shape": shape, "centre": centre}


def warm_up_tower_on_patches(model, processor, spec: build.Spec, steps: int, seed: int, log) -> dict[str, float]:
    """Train the tower's patch tokens on per-patch labels of fresh scenes (seed stream distinct from training's)."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    grid = spec.grid
    heads = torch.nn.ModuleDict({
        "colour": torch.nn.Linear(width, len(scenes.COLORS) + 1),
        "shape": torch.nn.Linear(width, len(scenes.SHAPES) + 1),
        "centre": torch.nn.Linear(width, 2),
        "row": torch.nn.Linear(width, grid),
        "col": torch.nn.Linear(width, grid),
    })
    params = list(tower.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    positions = torch.arange(grid * grid)
    tower.train()
    hits: dict[str, list[float]] = {name: [] for name in heads}
    batch_size = 32
    for step in range(steps):
        lr_scale = min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * lr_scale
        batch = [scenes.scene(seed + 1000, step * batch_size + j) for j in range(batch_size)]
        pixels = processor.image_processor([sc.image for sc in batch], return_tensors="pt")["pixel_values"]
        labels = [patch_labels(sc, grid) for sc in batch]
        targets = {name: torch.cat([lab[name] for lab in labels]) for name in ("colour", "shape", "centre")}
        targets["row"] = (positions // grid).repeat(batch_size)
        targets["col"] = (positions % grid).repeat(batch_size)
        tokens = tower(pixels).last_hidden_state[:, 1:].reshape(-1, width)  # [batch * patches, width]
        loss = 0.0
        for name, head in heads.items():
            logits = head(tokens)
            loss = loss + F.cross_entropy(logits, targets[name])
            if step >= steps - 20:
                hits[name].append((logits.argmax(-1) == targets[name]).float().mean().item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            log(f"tower warm-up step {step}/{steps} loss {loss.item():.3f}")
    tower.eval()
    return {name: round(sum(v) / len(v), 4) for name, v in hits.items() if v}


def word_embedding_targets(model, processor) -> dict[str, torch.Tensor]:
    """The language model's input embedding of each colour, shape and "none" word (mean over its tokens)."""
    table = model.get_input_embeddings().weight.detach()
    targets = {}
    for word in (*scenes.COLORS, *scenes.SHAPES, "none"):
        ids = processor.tokenizer(word, add_special_tokens=False)["input_ids"]
        targets[word] = table[ids].mean(0)
    return targets


def align_projector_to_words(model, processor, spec: build.Spec, steps: int, seed: int, log) -> float:
    """Start the projector where the language model can already read it: each patch token is mapped to the sum
    of the input embeddings of the words of its colour and its shape ("none" twice for background patches),
    from the (frozen) warmed-up tower. Returns the final relative squared error."""
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    words = word_embedding_targets(model, processor)
    colour_table = torch.stack([words[c] for c in scenes.COLORS] + [words["none"]])  # [colours + 1, hidden]
    shape_table = torch.stack([words[s] for s in scenes.SHAPES] + [words["none"]])  # [shapes + 1, hidden]
    for p in projector.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=2e-3, weight_decay=0.0)
    batch_size, relative_error = 32, float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        batch = [scenes.scene(seed + 2000, step * batch_size + j) for j in range(batch_size)]
        pixels = processor.image_processor([sc.image for sc in batch], return_tensors="pt")["pixel_values"]
        labels = [patch_labels(sc, spec.grid) for sc in batch]
        colour = torch.cat([lab["colour"] for lab in labels])
        shape = torch.cat([lab["shape"] for lab in labels])
        target = colour_table[colour] + shape_table[shape]  # [batch * patches, hidden]
        with torch.no_grad():
            features = tower(pixels).last_hidden_state[:, 1:]
        projected = projector(features).reshape(target.shape)
        loss = (projected - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        relative_error = loss.item()
        if step % 50 == 0:
            log(f"projector to word embeddings step {step}/{steps} relative error {relative_error:.3f}")
    return round(relative_error, 4)


def scene_step_items(step: int, images_per_step: int) -> list[list[scenes.Item]]:
    """The training questions of one alignment step: fresh scenes, about eight questions each."""
    batch = []
    for j in range(images_per_step):
        index = step * images_per_step + j
        scene = scenes.scene(scenes.TRAIN_SEED, index)
        batch.append(scenes.questions_for(scene, random.Random(f"train-questions:{index}")))
    return batch


MONITOR_SEED = 2  # held-out monitoring during training: neither the training scenes nor the evaluation set
MONITOR_SIZE = 140


@torch.no_grad()
def scenes_monitor(model, processor, prefix, monitor_items, pad_id) -> dict[str, float]:
    """Teacher-forced answer accuracy on held-out scene questions, overall and per kind."""
    ok_by_kind: dict[str, list[bool]] = {}
    for start in range(0, len(monitor_items), 10):
        chunk = monitor_items[start : start + 10]
        blocks = [tokenize_blocks(processor, [item])[1] for item in chunk]
        pixels = processor.image_processor([item.image for item in chunk], return_tensors="pt")["pixel_values"]
        _, question_ok = answer_loss(model, prefix, blocks, pixels, pad_id)
        for item, ok in zip(chunk, question_ok.tolist()):
            ok_by_kind.setdefault(item.kind, []).append(ok)
    result = {kind: sum(v) / len(v) for kind, v in sorted(ok_by_kind.items())}
    result["all"] = sum(sum(v) for v in ok_by_kind.values()) / len(monitor_items)
    return result


def check_disjoint(n_train_scenes: int, log) -> None:
    """Refuse to train if any evaluation image equals a training image (pixel for pixel)."""
    eval_digests = {scenes.image_digest(item.image) for item in scenes.sample(scenes.EVAL_SIZE, scenes.EVAL_SEED)}
    eval_digests |= {scenes.image_digest(item.image) for item in scenes.sample(MONITOR_SIZE, MONITOR_SEED)}
    for i in range(n_train_scenes):
        if scenes.image_digest(scenes.scene(scenes.TRAIN_SEED, i).image) in eval_digests:
            raise RuntimeError(f"training scene {i} equals an evaluation image")
    log(f"checked: none of {n_train_scenes} training scenes equals an evaluation or monitoring image")


def answer_loss(model, prefix, blocks_batch, pixel_batch, pad_id):
    """Mean over questions of each question's mean answer-token loss; also per-question correctness [Q]."""
    input_ids, position_ids, mask, targets = pack(prefix, blocks_batch, pad_id)
    hidden = model.model(
        input_ids=input_ids, pixel_values=pixel_batch, attention_mask=mask, position_ids=position_ids
    ).last_hidden_state
    logits = model.lm_head(hidden[targets.rows, targets.cols])
    token_loss = F.cross_entropy(logits, targets.labels, reduction="none")
    n_questions = int(targets.question[-1]) + 1
    tokens_per_question = torch.bincount(targets.question, minlength=n_questions).float()
    loss = (token_loss / tokens_per_question[targets.question]).sum() / n_questions
    token_wrong = (logits.argmax(-1) != targets.labels).float()
    question_ok = torch.zeros(n_questions).index_add_(0, targets.question, token_wrong) == 0
    return loss, question_ok


@torch.no_grad()
def quick_accuracy(model, prefix, image_blocks, pixels, image_ids, pad_id) -> float:
    """Share of held-out questions whose whole answer is predicted token by token (teacher forcing)."""
    hits = total = 0
    for start in range(0, len(image_ids), 8):
        chunk = image_ids[start : start + 8]
        _, question_ok = answer_loss(
            model, prefix, [image_blocks[i] for i in chunk], torch.stack([pixels[i] for i in chunk]), pad_id
        )
        hits += question_ok.sum().item()
        total += len(question_ok)
    return hits / total


# Per bundled model: alignment steps, tower warm-up steps, and the alignment stage's learning rates of the projector
# (None: LoRA's) and the tower; 0 freezes a part. scenes-smollm2 freezes both: trained through the answer loss they
# drift away from the word-readable tokens of the projector stage and lose the shape (README).
DEFAULTS = {
    "evqa-smollm2": {"steps": 800, "tower_steps": 400, "projector_lr": None, "tower_lr": 3e-4},
    "scenes-smollm2": {"steps": 600, "tower_steps": 300, "projector_lr": 0.0, "tower_lr": 0.0},
}


def write_weights(model, lora: LoRA, record: dict, out: Path) -> float:
    """Write the trained tensors and the run's record next to them (atomically); returns the size in MB."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(trained_state(model, lora), str(tmp), metadata={"record": json.dumps(record)})
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return out.stat().st_size / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(build.SPECS), default=build.NAME, help="which bundled model")
    parser.add_argument("--steps", type=int, default=0,
                        help="alignment steps (4 images, ~42 questions each); 0: the model's default")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="end after this many steps (the schedule still spans --steps); 0: at --steps")
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--tower-steps", type=int, default=0, help="tower warm-up steps; 0: the model's default")
    parser.add_argument("--projector-steps", type=int, default=300,
                        help="scenes-smollm2: projector steps towards the colour/shape word embeddings (0: none)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of LoRA")
    parser.add_argument("--projector-lr", type=float, default=None,
                        help="peak learning rate of the projector in the alignment stage (0: frozen); default: the "
                             "model's (evqa-smollm2: --lr; scenes-smollm2: 0)")
    parser.add_argument("--tower-lr", type=float, default=None,
                        help="peak learning rate of the vision tower in the alignment stage (0: frozen); default: "
                             "the model's (evqa-smollm2: 3e-4; scenes-smollm2: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="weights file (default: the package's)")
    args = parser.parse_args(argv)
    spec = build.spec_for(args.model)
    is_scenes = args.model == "scenes-smollm2"
    args.steps = args.steps or DEFAULTS[args.model]["steps"]
    args.tower_steps = args.tower_steps or DEFAULTS[args.model]["tower_steps"]
    defaults = DEFAULTS[args.model]
    if args.projector_lr is None:
        args.projector_lr = args.lr if defaults["projector_lr"] is None else defaults["projector_lr"]
    if args.tower_lr is None:
        args.tower_lr = defaults["tower_lr"]
    args.out = args.out or spec.weights
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path("runs") / args.model
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, processor = build.build_untrained(seed=args.seed, name=args.model)
    pad_id = processor.tokenizer.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoRA(model, build.LORA_RANK, build.LORA_TARGETS, seed=args.seed)

    prefix, _ = tokenize_blocks(processor, [data.Question(0, "?", "yes")], spec.n_visual)
    if is_scenes:
        check_disjoint(args.steps * args.images_per_step, log)
        monitor_items = scenes.sample(MONITOR_SIZE, MONITOR_SEED)
        log(f"scenes: {args.steps * args.images_per_step} fresh training scenes; prefix {len(prefix)} tokens")
    else:
        train_items = data.questions("train")
        train_pixels = load_pixels(processor, "train")
        test_pixels = load_pixels(processor, "test")
        train_groups = data.with_open_questions(data.by_image(train_items), seed=args.seed)
        test_groups = data.by_image(data.questions("test"))
        train_blocks = {i: tokenize_blocks(processor, items)[1] for i, items in train_groups.items()}
        held_out_ids = sorted(test_groups)[-40:]  # monitoring only; not part of any reported evaluation set
        held_out_blocks = {i: tokenize_blocks(processor, test_groups[i])[1] for i in held_out_ids}
        log(f"{len(train_items)} train questions on {len(train_groups)} images; prefix {len(prefix)} tokens")

    checkpoint = run_dir / "checkpoint.pt"
    tower_params = list(model.model.vision_tower.parameters())
    projector_params = list(model.model.multi_modal_projector.parameters())
    record = {"seed": args.seed, "steps": args.steps, "images_per_step": args.images_per_step}
    start_step, elapsed = 0, 0.0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        build.apply_trained(model, {k: v for k, v in saved["state"].items() if not k.startswith("lora.")})
        for k, name in enumerate(lora.names):
            lora.a[k].data.copy_(saved["state"][f"lora.{name}.A"])
            lora.b[k].data.copy_(saved["state"][f"lora.{name}.B"])
        start_step, elapsed, record = saved["step"], saved["elapsed"], saved["record"]
        if record["steps"] != args.steps:  # a resumed run may shorten or lengthen its schedule
            log(f"schedule changed from {record['steps']} to {args.steps} steps")
            record.setdefault("schedule_changes", []).append([start_step, args.steps])
            record["steps"] = args.steps
        log(f"resumed at step {start_step} ({elapsed / 60:.1f} min so far)")
    else:
        t0 = time.time()
        if is_scenes:
            record["tower_warmup_accuracy"] = warm_up_tower_on_patches(
                model, processor, spec, args.tower_steps, args.seed, log
            )
            record["tower_warmup_seconds"] = round(time.time() - t0)
            if args.projector_steps:
                record["projector_word_error"] = align_projector_to_words(
                    model, processor, spec, args.projector_steps, args.seed, log
                )
        else:
            record["tower_warmup_accuracy"] = warm_up_tower(
                model, train_pixels, train_items, args.tower_steps, args.seed, log
            )
        elapsed = time.time() - t0
        log(f"tower warm-up: accuracy {record['tower_warmup_accuracy']} in {elapsed:.0f}s")

    groups = [(list(lora.parameters()), args.lr), (projector_params, args.projector_lr), (tower_params, args.tower_lr)]
    trainable = []
    for params, lr in groups[1:]:
        for p in params:
            p.requires_grad_(lr > 0)  # a frozen part is left out of the optimizer and of the backward pass
    for params, _ in groups:
        trainable += [p for p in params if p.requires_grad]
    record["alignment_lr"] = {"lora": args.lr, "projector": args.projector_lr, "tower": args.tower_lr}
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr} for params, lr in groups if lr > 0], weight_decay=0.0
    )
    peaks = [group["lr"] for group in optimizer.param_groups]
    if start_step:
        optimizer.load_state_dict(saved["optimizer"])
    warmup = 30

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if not is_scenes:
        image_ids = sorted(train_groups)
        per_epoch = len(image_ids) // args.images_per_step

    def batch_for(step: int):
        """(question blocks per image, pixel values [images, 3, H, W]) of one alignment step."""
        if is_scenes:
            per_image = scene_step_items(step, args.images_per_step)
            blocks = [tokenize_blocks(processor, items, spec.n_visual)[1] for items in per_image]
            images = [items[0].image for items in per_image]
            return blocks, processor.image_processor(images, return_tensors="pt")["pixel_values"]
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(image_ids), generator=torch.Generator().manual_seed(args.seed + epoch))
        chunk = [image_ids[i] for i in order[k * args.images_per_step : (k + 1) * args.images_per_step]]
        return [train_blocks[i] for i in chunk], torch.stack([train_pixels[i] for i in chunk])

    model.train()
    t_last = time.time()
    last_step = min(args.steps, args.stop_after) if args.stop_after else args.steps
    record["stopped_after"] = last_step
    check_every = 50 if is_scenes else 100
    for step in range(start_step, last_step):
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * schedule(step)
        blocks, pixels = batch_for(step)
        loss, question_ok = answer_loss(model, prefix, blocks, pixels, pad_id)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if step % 5 == 0:
            log(f"step {step}/{last_step} loss {loss.item():.3f} answer acc {question_ok.float().mean():.2f} "
                f"{elapsed / 60:.1f} min")
        done = step + 1 == last_step
        if (step + 1) % 25 == 0 or done:
            if (step + 1) % check_every == 0 or done:
                model.eval()
                if is_scenes:
                    accuracy = scenes_monitor(model, processor, prefix, monitor_items, pad_id)
                    record["monitor_accuracy"] = accuracy["all"]
                    record["monitor_accuracy_per_kind"] = {k: round(v, 3) for k, v in accuracy.items()}
                    record.setdefault("curve", []).append([step + 1, round(elapsed / 60, 1), round(accuracy["all"], 3)])
                    log(f"step {step + 1}: held-out answer accuracy {accuracy['all']:.3f} (teacher-forced, "
                        f"{MONITOR_SIZE} questions of seed {MONITOR_SEED}) " +
                        " ".join(f"{k} {v:.2f}" for k, v in accuracy.items() if k != "all"))
                else:
                    acc = quick_accuracy(model, prefix, held_out_blocks, test_pixels, held_out_ids, pad_id)
                    record["monitor_accuracy"] = acc
                    log(f"step {step + 1}: held-out answer accuracy {acc:.3f} (teacher-forced, 40 test images)")
                model.train()
                if is_scenes:  # the latest weights at every check, in the run folder (not the package's file,
                    record["steps_done"] = step + 1  # which evaluations may be reading while this trains)
                    record["train_minutes"] = round(elapsed / 60, 1)
                    latest = run_dir / args.out.name
                    size_mb = write_weights(model, lora, record, latest)
                    log(f"exported step {step + 1} to {latest} ({size_mb:.1f} MB)")
            state = trained_state(model, lora)
            torch.save(
                {"state": state, "optimizer": optimizer.state_dict(), "step": step + 1, "elapsed": elapsed,
                 "record": record},
                checkpoint.with_suffix(".tmp"),
            )
            checkpoint.with_suffix(".tmp").replace(checkpoint)
            t_last = time.time()

    record["train_minutes"] = round(elapsed / 60, 1)
    if is_scenes:
        record["steps_done"] = last_step
    size_mb = write_weights(model, lora, record, args.out)
    log(f"wrote {args.out} ({size_mb:.1f} MB): {record}")


if __name__ == "__main__":
    main()
