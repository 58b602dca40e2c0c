"""Accuracy of a method on an evaluation set (easy-vqa's, or the scene questions of `scenes-smollm2`), answer by
answer, resumable, with the object recall of the kept tokens (and accuracy per question kind on scenes).

Every answer is appended to a JSON-lines file as soon as it is produced. The file's first line holds the
settings of the run; rerunning with the same file and settings skips the questions already answered (a
torn last line from an interrupted write is dropped), with other settings it refuses to mix results.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import layout
from ..vqa import answer_batch, calibrate_for
from ..zoo import data

EVAL_SETS = ("test-2000", "test", "scenes", "scenes:SEED", "scenes:SEED:N")
EVAL_SEED = 0


def eval_questions(name: str = "test-2000") -> list:
    """The evaluation sets. easy-vqa (`data.Question` each): "test", all 9,673 test questions, or "test-2000",
    2,000 of them drawn with seed 0. Scenes (`scenes.Item` each, for `scenes-smollm2`): "scenes", the evaluation
    set `scenes.sample(700, seed=1)`, or "scenes:SEED" / "scenes:SEED:N", N (default 700) fresh questions of
    another seed."""
    if name == "scenes" or name.startswith("scenes:"):
        return _scene_questions(name)
    items = list(data.questions("test"))
    if name == "test":
        return items
    if name == "test-2000":
        picked = sorted(random.Random(EVAL_SEED).sample(range(len(items)), 2000))
        return [items[i] for i in picked]
    raise ValueError(f"eval set must be one of {', '.join(EVAL_SETS)}, got {name!r}")


def _scene_questions(name: str) -> list:
    from ..zoo import scenes

    parts = name.split(":")[1:]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = None
    if numbers is None or len(numbers) > 2 or any(n < 0 for n in numbers) or (len(numbers) == 2 and not numbers[1]):
        raise ValueError(f"a scenes eval set is 'scenes', 'scenes:SEED' or 'scenes:SEED:N' (whole numbers, N >= 1), "
                         f"got {name!r}")
    seed = numbers[0] if numbers else scenes.EVAL_SEED
    count = numbers[1] if len(numbers) == 2 else scenes.EVAL_SIZE
    return scenes.sample(count, seed)


def default_set(model_name: str) -> str:
    """The evaluation set a bundled model is measured on: "scenes" for scenes-smollm2, "test-2000" otherwise."""
    return "scenes" if model_name == "scenes-smollm2" else "test-2000"


# ----------------------------------------------------------------------------- object recall


PATCH_COVER = 0.25  # a patch shows an object when at least this share of its pixels belongs to it


def covered_patches(mask, grid: tuple[int, int], min_cover: float = PATCH_COVER, region=layout.WHOLE) -> torch.Tensor:
    """Bool [rows * cols] (row-major): patches of a grid laid over `region` of an image (all of it by default) at
    least `min_cover` covered by mask [H, W] (a bool array or tensor). The grid need not divide the mask: a patch
    counts the pixels it cuts by the area inside it. The object recall of easy-vqa and of the scenes model both
    count these."""
    cover = layout.cell_coverage(torch.as_tensor(np.asarray(mask)), grid, region)
    return (cover >= min_cover).flatten()


def shape_mask(image: Image.Image) -> torch.Tensor:
    """Bool [H, W]: the pixels of an easy-vqa image's shape. easy-vqa draws one shape on a uniform background,
    so the shape is every pixel whose colour differs from the most common border colour."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).int()  # [H, W, 3]
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = border.unique(dim=0, return_counts=True)
    background = colours[counts.argmax()]
    return (pixels - background).abs().sum(-1) > 30


def object_patches(image: Image.Image, grid: tuple[int, int], min_cover: float = PATCH_COVER) -> torch.Tensor:
    """Bool [rows * cols]: patches of an easy-vqa image at least `min_cover` covered by the shape."""
    return covered_patches(shape_mask(image), grid, min_cover)


def item_image(item) -> Image.Image:
    """The RGB image of an evaluation item (a scenes item carries it; easy-vqa's is read from its file)."""
    if isinstance(item, data.Question):
        return Image.open(data.image_paths("test")[item.image_id]).convert("RGB")
    return item.image


def item_object_mask(item, image: Image.Image):
    """Bool [H, W]: the pixels object recall counts: easy-vqa's shape, or the objects a scene question is about."""
    return shape_mask(image) if isinstance(item, data.Question) else item.mask


def image_tokens(images: list[layout.PromptImage], kept_positions: torch.Tensor | None) -> dict:
    """What an answer row records about a sample's images: `n_visual` (visual tokens), `kept_patches` (indices,
    in token order over all the sample's visual tokens, of the kept ones) and `kept_per_image`."""
    positions = torch.cat([image.positions for image in images]) if images else torch.zeros(0, dtype=torch.long)
    kept = list(range(positions.numel())) if kept_positions is None else layout.kept_in(positions, kept_positions)
    per_image = [len(image.positions) if kept_positions is None else len(layout.kept_in(image.positions,
                                                                                           kept_positions))
                 for image in images]
    return {"n_visual": positions.numel(), "kept_patches": kept, "kept_per_image": per_image}


def object_recall(images: list[layout.PromptImage], kept_positions: torch.Tensor, mask) -> float | None:
    """Share of the object's patches that were kept, over every grid of the sample's images whose region of the
    picture is known (layout.py): the mask is laid over each grid's region (the whole picture, or a tile), a patch
    shows the object when `PATCH_COVER` of it is covered. None when no patch shows the object."""
    covered_total, kept_total = 0, 0
    for image in images:
        for view in image.views:
            if view.region is None:
                continue
            covered = covered_patches(mask, view.grid, region=view.region)
            kept = torch.zeros_like(covered)
            kept[layout.kept_in(view.positions, kept_positions)] = True
            covered_total += int(covered.sum())
            kept_total += int((covered & kept).sum())
    return kept_total / covered_total if covered_total else None


# ----------------------------------------------------------------------------- the run


def weights_setting(model) -> dict:
    """{"weights": the bundled model's name and weights digest} when the model knows it (cm.load_model), so that a
    resumed run refuses to mix answers of other weights; {} otherwise."""
    weights = getattr(model, "_corematching_weights", None)
    return {"weights": weights} if weights else {}


def method_settings(method) -> dict:
    if method is None:
        return {"method": "Dense"}
    if is_dataclass(method):
        fields = asdict(method)
    else:  # a plain class: its public attributes
        fields = {name: value for name, value in vars(method).items() if not name.startswith("_")}
    # as the JSON-lines file will hold them (tuples become lists), so that a resumed run compares equal
    return json.loads(json.dumps({"method": type(method).__name__, **fields}, default=repr))


@dataclass
class Summary:
    settings: dict
    answered: int
    accuracy: float
    mean_kept: float | None
    object_recall: float | None
    per_kind: dict | None = None  # {question kind: (accuracy, questions)} when the items have kinds (scenes)


def same_settings(found, expected: dict) -> bool:
    """Whether a results file's settings are `expected` (a file written before runs recorded their weights is
    compared without them)."""
    if isinstance(found, dict) and "weights" not in found:
        expected = {key: value for key, value in expected.items() if key != "weights"}
    return found == expected


def read_results(path: Path, settings: dict) -> list[dict]:
    """The answers already in `path`; raises when the file belongs to other settings."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise ValueError(f"{path}: line {k + 1} is not valid JSON") from None
            # a torn last line from an interrupted run: drop it from the file
            path.write_text("".join(line + "\n" for line in lines[:-1]))
    if not rows:
        return []
    if not same_settings(rows[0].get("settings"), settings):
        raise ValueError(
            f"{path} holds results of other settings ({rows[0].get('settings')}); use another --output"
        )
    return rows[1:]


def answered_indices(output: Path, settings: dict) -> set[int]:
    """Questions answered in `output` or any of its rank files (see distributed.py)."""
    from .distributed import result_files

    return {row["index"] for path in result_files(output) for row in read_results(path, settings)}


def run_eval(model, processor, method, items: list, output: Path, batch_size: int = 16, progress: bool = True,
             max_new_tokens: int = 8, shard=None, settings_extra: dict | None = None) -> Summary:
    """Answer every question of `items` (of `eval_questions`) not answered yet, appending to `output`; with a
    `distributed.Shard` of several ranks, this rank answers its share of them into its own rank file.
    `settings_extra` joins the settings on the file's first line (a resumed run must match them)."""
    from tqdm import tqdm

    from .distributed import Shard

    shard = shard or Shard()
    settings = {**method_settings(method), **weights_setting(model), **(settings_extra or {}), "questions": len(items)}
    output.parent.mkdir(parents=True, exist_ok=True)
    pending = None
    if shard.is_main:
        done_indices = answered_indices(output, settings)
        pending = [k for k in range(len(items)) if k not in done_indices]
    todo = shard.share(pending)
    sink_path = shard.result_file(output)
    if not sink_path.exists() or sink_path.stat().st_size == 0:
        sink_path.write_text(json.dumps({"settings": settings}) + "\n")
    bar = tqdm(total=len(todo), disable=not progress, desc=settings["method"], unit="q", dynamic_ncols=True)
    if method is not None and method.needs_calibration():  # TEAL: from the set's first batch, on every rank
        first = range(min(batch_size, len(items)))
        calibrate_for(model, processor, [item_image(items[k]) for k in first], [items[k].question for k in first],
                      method)
    with sink_path.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [item_image(items[k]) for k in chunk]
            questions = [items[k].question for k in chunk]
            answers = answer_batch(model, processor, images, questions, method, max_new_tokens)
            predictions, record = answers.texts, answers.record
            prompt_images = layout.prompt_images(model, answers.inputs) if record is not None else None
            image_processor = getattr(processor, "image_processor", None)
            for row, k in enumerate(chunk):
                item = items[k]
                result = {"index": k, **_item_fields(item), "question": item.question, "answer": item.answer,
                          "prediction": predictions[row], "correct": predictions[row] == item.answer}
                if record is not None and record.kept_positions is not None:
                    sample_images = prompt_images[row]
                    layout.place_for_picture(sample_images, *images[row].size, image_processor)
                    kept_positions = record.kept_positions[row]
                    result.update(image_tokens(sample_images, kept_positions))
                    recall = object_recall(sample_images, kept_positions, item_object_mask(item, images[row]))
                    if recall is not None:  # a scene question about absent objects has no patch to keep
                        result["object_recall"] = recall
                sink.write(json.dumps(result) + "\n")
            sink.flush()
            bar.update(len(chunk))
    bar.close()
    shard.barrier()  # every rank's answers are written before anyone summarizes
    return summarize(output, settings)


def _item_fields(item) -> dict:
    """What identifies an item's image in its answer row: easy-vqa's image id, or a scene question's kind."""
    return {"image_id": item.image_id} if isinstance(item, data.Question) else {"kind": item.kind}


def summarize(output: Path, settings: dict | None = None) -> Summary:
    """The answers of `output` and its rank files together."""
    from .distributed import result_files

    header, answers, seen = None, [], set()
    for path in result_files(output):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        file_settings = rows[0]["settings"]
        mismatch = settings is not None and not same_settings(file_settings, settings)
        if mismatch or (header is not None and file_settings != header):
            raise ValueError(f"{path} holds other settings")
        header = file_settings
        for row in rows[1:]:
            if row["index"] in seen:
                raise ValueError(f"{path}: question {row['index']} is answered twice")
            seen.add(row["index"])
            answers.append(row)
    if header is None:
        raise ValueError(f"no answers in {output}")
    kept = [len(r["kept_patches"]) for r in answers if "kept_patches" in r]
    recall = [r["object_recall"] for r in answers if "object_recall" in r]
    kinds = {}
    for r in sorted(answers, key=lambda r: r["index"]):
        if "kind" in r:
            kinds.setdefault(r["kind"], []).append(r["correct"])
    return Summary(
        settings=header,
        answered=len(answers),
        accuracy=sum(r["correct"] for r in answers) / max(1, len(answers)),
        mean_kept=sum(kept) / len(kept) if kept else None,
        object_recall=sum(recall) / len(recall) if recall else None,
        per_kind={kind: (sum(right) / len(right), len(right)) for kind, right in kinds.items()} or None,
    )
