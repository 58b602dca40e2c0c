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


PASSED_THROUGH = ("device_map", "max_memory", "offload_folder", "offload_state_dict", "attn_implementation",
                  "revision", "cache_dir", "local_files_only", "token", "low_cpu_mem_usage", "quantization_config")


def load_model(name_or_path: str = BUNDLED, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               **options):
    """Return ``(model, processor)`` in eval mode.

    ``"evqa-smollm2"`` and ``"scenes-smollm2"`` are the project's own small real VLMs, loaded offline; anything
    else goes to ``transformers`` (``AutoModelForImageTextToText``/``AutoProcessor``). fp32 on CPU by default
    (bf16 matmuls are very slow on CPUs), bf16 on accelerators. Without torchvision, processors that take a video
    processor (Qwen-VL, InternVL, LLaVA-OneVision, SmolVLM) are built with images only, and Pixtral's without its
    torchvision import (`corematching.processors.load_processor`, which logs a warning saying so).

    `options` go to ``from_pretrained`` as they would from a transformers user: ``device_map`` (then the model is
    placed by it, not moved to `device`), ``max_memory``, ``offload_folder``, ``attn_implementation`` ("sdpa" or
    "eager": what sparsify supports), ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
    ``low_cpu_mem_usage``, ``quantization_config``. ``trust_remote_code`` is refused: sparsify works on the
    transformers classes of the supported families, never on a checkpoint's own modeling code.
    """
    if options.get("trust_remote_code"):
        raise ValueError(
            "trust_remote_code=True is not supported: corematching sparsifies the transformers classes of its "
            "supported families (cm.supported_models()), not a checkpoint's own modeling code; load the checkpoint's "
            "transformers version (e.g. an '-hf' repository) instead"
        )
    options.pop("trust_remote_code", None)
    unknown = sorted(set(options) - set(PASSED_THROUGH))
    if unknown:
        raise TypeError(f"load_model() got unexpected options {', '.join(unknown)} (passed through to "
                        f"from_pretrained: {', '.join(PASSED_THROUGH)})")
    device_map = options.get("device_map")
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        on_cpu = device_map in (None, "cpu") and torch.device(device or "cpu").type == "cpu"
        dtype = torch.float32 if on_cpu else torch.bfloat16
    if name_or_path in SPECS:
        if options:
            raise ValueError(f"{name_or_path} is a bundled model built in place: it takes device and dtype only, "
                             f"not {', '.join(sorted(options))}")
        from .build import load_bundled

        return load_bundled(name_or_path, device=torch.device(device), dtype=dtype)
    from transformers import AutoModelForImageTextToText

    from ..processors import load_processor

    if not options.get("local_files_only"):
        check_reachable(name_or_path)
    hub_keys = ("revision", "cache_dir", "local_files_only", "token")  # what the processor's loading takes too
    hub_options = {key: options[key] for key in hub_keys if key in options}
    try:
        processor = load_processor(name_or_path, **hub_options)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, **options)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from error
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"  # batched generation
    if device_map is None:
        model = model.to(torch.device(device))
    return model.eval(), processor
