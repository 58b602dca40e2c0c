"""A few example images for the web page's picker, with one question and its answer each: scenes for
`scenes-smollm2`, easy-vqa test images for every other model."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

EXAMPLE_COUNT = 6


@lru_cache(maxsize=4)
def example_images(model_name: str = "") -> list[dict]:
    try:
        return scene_images(EXAMPLE_COUNT) if model_name == "scenes-smollm2" else test_images(EXAMPLE_COUNT)
    except ImportError:
        return []


def test_images(count: int) -> list[dict]:
    """The first `count` easy-vqa test images (by id), each as a data URL with its first question and answer."""
    from corematching.zoo import data

    paths = data.image_paths("test")
    grouped = data.by_image(data.questions("test"))
    out = []
    for image_id in sorted(grouped)[:count]:
        question = grouped[image_id][0]
        with open(paths[image_id], "rb") as handle:
            out.append(_example(f"test-{image_id}", handle.read(), question.question, question.answer))
    return out


def scene_images(count: int) -> list[dict]:
    """The first `count` questions of the scenes evaluation set, each with its scene as a data URL."""
    from corematching.zoo import scenes

    out = []
    for k, item in enumerate(scenes.sample(count, scenes.EVAL_SEED)):
        png = io.BytesIO()
        item.image.save(png, format="PNG")
        out.append(_example(f"scene-{k}", png.getvalue(), item.question, item.answer))
    return out


def _example(example_id: str, png: bytes, question: str, answer: str) -> dict:
    encoded = base64.b64encode(png).decode("ascii")
    return {"id": example_id, "url": f"data:image/png;base64,{encoded}", "question": question, "answer": answer}
