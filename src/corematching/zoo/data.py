"""easy-vqa, the real VQA data of the bundled model: 64x64 images of one coloured shape, 13 answers."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


@dataclass(frozen=True)
class Question:
    image_id: int
    question: str
    answer: str


@lru_cache(maxsize=2)
def questions(split: str) -> tuple[Question, ...]:
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return tuple(Question(int(i), q, a) for q, a, i in zip(texts, answers, image_ids))


@lru_cache(maxsize=2)
def image_paths(split: str) -> dict[int, str]:
    import easy_vqa

    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return {int(k): v for k, v in paths.items()}


def by_image(items) -> dict[int, list[Question]]:
    grouped: dict[int, list[Question]] = defaultdict(list)
    for q in items:
        grouped[q.image_id].append(q)
    return dict(grouped)


def majority_answer(split: str = "train") -> str:
    return Counter(q.answer for q in questions(split)).most_common(1)[0][0]


def shape_and_color(items: list[Question]) -> tuple[str | None, str | None]:
    """An image's shape and colour, read off its question/answer pairs (None where they do not say)."""
    shape = color = None
    for q in items:
        text = q.question.lower()
        if q.answer in SHAPES and "shape" in text:
            shape = q.answer
        elif q.answer in COLORS and "color" in text:
            color = q.answer
        elif q.answer == "yes" and not {"not", "no"} & set(text.rstrip("?").split()):
            shape = next((s for s in SHAPES if s in text), shape)
            color = next((c for c in COLORS if c in text), color)
    return shape, color


COLOR_TEMPLATES = ("what color is the shape?", "what is the color of the shape?", "what color is the {shape}?")
SHAPE_TEMPLATES = ("what shape is in the image?", "what shape does the image contain?", "what is the {color} shape?")


def with_open_questions(grouped: dict[int, list[Question]], seed: int) -> dict[int, list[Question]]:
    """Add one colour and one shape question (easy-vqa's own templates) to every image whose labels are known.

    Open questions are a small share of easy-vqa and the slowest to learn; the added ones are built only from
    the training split's own answers.
    """
    import random

    rng = random.Random(seed)
    out = {}
    for image_id, items in grouped.items():
        shape, color = shape_and_color(items)
        extra = []
        if shape and color:
            asked = {q.question for q in items}
            for templates, answer in ((COLOR_TEMPLATES, color), (SHAPE_TEMPLATES, shape)):
                text = rng.choice(templates).format(shape=shape, color=color)
                if text not in asked:
                    extra.append(Question(image_id, text, answer))
        out[image_id] = list(items) + extra
    return out
