"""Models to run: the bundled `evqa-smollm2` and `scenes-smollm2`, or any transformers VLM checkpoint (hub id or
local path)."""

from __future__ import annotations

import torch

from .build import NAME as BUNDLED
from .build import SPECS

BUNDLED_MODELS = tuple(SPECS)

__all__ = ["BUNDLED", "BUNDLED_MODELS", "load_model"]


def load_model(name_or_path: str = BUNDLED, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, processor)`` in eval mode.

    ``"evqa-smollm2"`` and ``"scenes-smollm2"`` are the project's own small real VLMs, loaded offline; anything else goes to
    ``transformers`` (``AutoModelForImageTextToText``/``AutoProcessor``). fp32 on CPU by default (bf16 matmuls
    are very slow on CPUs), bf16 on accelerators.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if name_or_path in SPECS:
        from .build import load_bundled

        return load_bundled(name_or_path, device=device, dtype=dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from error
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"  # batched generation
    return model.to(device).eval(), processor
