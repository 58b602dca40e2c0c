"""Models to run: the bundled `evqa-smollm2` and `scenes-smollm2`, or any transformers VLM checkpoint (hub id or
local path)."""

from __future__ import annotations

import torch

from .build import NAME as BUNDLED
from .build import SPECS

BUNDLED_MODELS = tuple(SPECS)

__all__ = ["BUNDLED", "BUNDLED_MODELS", "check_reachable", "load_model"]

HUB_PROBE_SECONDS = 3.0


def check_reachable(name_or_path: str) -> None:
    """Fail within seconds, naming the problem, when a model is neither a local directory, nor in the local
    Hugging Face cache, nor downloadable (offline machine): transformers would otherwise retry for minutes."""
    import os
    import socket
    from pathlib import Path
    from urllib.parse import urlparse

    if Path(name_or_path).is_dir():
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError as error:  # neither a directory nor a well-formed repo id
        raise ValueError(f"cannot load model {name_or_path!r}: no such directory, and not a model id") from error
    if isinstance(cached, str):
        return  # cached: transformers loads it offline
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    reachable = False
    if not offline:
        try:
            port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
            socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
            reachable = True
        except OSError:
            pass
    if not reachable:
        bundled = ", ".join(BUNDLED_MODELS)
        raise ValueError(
            f"cannot load model {name_or_path!r}: it is not a local directory, not in the Hugging Face cache, and "
            f"{endpoint.hostname} cannot be reached (bundled models that work offline: {bundled})"
        )


def load_model(name_or_path: str = BUNDLED, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, processor)`` in eval mode.

    ``"evqa-smollm2"`` and ``"scenes-smollm2"`` are the project's own small real VLMs, loaded offline; anything
    else goes to ``transformers`` (``AutoModelForImageTextToText``/``AutoProcessor``). fp32 on CPU by default
    (bf16 matmuls are very slow on CPUs), bf16 on accelerators.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if name_or_path in SPECS:
        from .build import load_bundled

        return load_bundled(name_or_path, device=device, dtype=dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_reachable(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from error
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"  # batched generation
    return model.to(device).eval(), processor
