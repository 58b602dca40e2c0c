"""Short answers to questions about images: one call around processor, generate and decode."""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
from PIL import Image

DEFAULT_MAX_NEW_TOKENS = 8


def short_answer(text: str) -> str:
    """The first line of a generated answer, stripped (a short answer never spans lines)."""
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def prompts_for(processor, questions: list[str]) -> list[str]:
    """The model's own chat format with one image and one question per prompt."""
    prompts = []
    for question in questions:
        if not question or not question.strip():
            raise ValueError("question is empty")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    return prompts


def check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA", "L", "P", "LA"):
        raise ValueError(f"unsupported image mode {image.mode!r} (expected RGB, RGBA, L, LA or P)")
    return image.convert("RGB")


class BatchAnswers(NamedTuple):
    texts: list[str]  # the answers, stripped
    record: object | None  # what the sparsify session decided at prefill (None without a method)
    input_ids: torch.Tensor  # [B, T] the prompts as the model saw them (left padded)
    inputs: dict | None = None  # what the processor gave the model (image sizes, grids, ...): layout.prompt_images


@torch.no_grad()
def answer_batch(model, processor, images, questions, method=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """Greedy short answers for parallel lists of images and questions, optionally under a sparsify method.

    Returns a ``BatchAnswers``: the texts, the session's record of the prefill and the prompt ids.
    """
    from .runtime import sparsify

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    images = [check_image(im) for im in images]
    # one list of images per prompt: processors that batch prompts (Gemma 3, Idefics3, ...) ask for them nested
    inputs = processor(images=[[image] for image in images], text=prompts_for(processor, questions),
                       return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    session = sparsify(model, method) if method is not None else nullcontext()
    with session:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        record = session.last if method is not None else None
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    answers = [short_answer(text) for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return BatchAnswers(answers, record, inputs["input_ids"], dict(inputs))


@torch.no_grad()
def calibrate_for(model, processor, images, questions, method) -> bool:
    """Calibrate a method with input-dependent state (TEAL's thresholds) on these images and questions, as
    answer_batch would prompt them (one prefill, session.calibrate); the method instance keeps the state for its
    later sessions on this model. Returns whether the method needed it (nothing runs otherwise)."""
    from .runtime import sparsify

    if method is None or not method.needs_calibration():
        return False
    images = [check_image(im) for im in images]
    inputs = processor(images=images, text=prompts_for(processor, questions), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with sparsify(model, method) as session:
        session.calibrate(**inputs)
    return True


def answer(model, processor, image, question: str, method=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """The model's short answer, as text, to `question` about `image` (a PIL image)."""
    return answer_batch(model, processor, [image], [question], method, max_new_tokens).texts[0]
