"""A few easy-vqa test images, with one question and its answer each, for the web page's picker."""

from __future__ import annotations

import base64
from functools import lru_cache

EXAMPLE_COUNT = 6


@lru_cache(maxsize=1)
def example_images() -> list[dict]:
    try:
        return test_images(EXAMPLE_COUNT)
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
            encoded = base64.b64encode(handle.read()).decode("ascii")
        out.append({"id": f"test-{image_id}", "url": f"data:image/png;base64,{encoded}",
                    "question": question.question, "answer": question.answer})
    return out
