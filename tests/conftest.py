"""Fixtures: tiny random LLaVA models and inputs (see tiny_llava.py)."""

import pytest
import torch
from tiny_llava import build_pixels, build_prompt, build_tiny_llava

_MODELS = {}


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids the thread-pool overhead that dominates at these sizes (and a shared
    CPU makes it worse). Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llava():
    """Factory: tiny_llava(attn="sdpa", num_layers=4, seed=0) -> a fresh-state model (cached per settings)."""

    def make(attn: str = "sdpa", num_layers: int = 4, seed: int = 0):
        key = (attn, num_layers, seed)
        if key not in _MODELS:
            _MODELS[key] = build_tiny_llava(attn, num_layers, seed)
        return _MODELS[key]

    return make


@pytest.fixture
def single_inputs():
    """Factory: single_inputs(text_before=3, text_after=5, seed=0) -> dict(input_ids, attention_mask, pixel_values)."""

    def make(text_before: int = 3, text_after: int = 5, seed: int = 0):
        prompt = build_prompt(text_before, text_after, seed)
        return {
            "input_ids": prompt.unsqueeze(0),
            "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "pixel_values": build_pixels(1, seed),
        }

    return make
