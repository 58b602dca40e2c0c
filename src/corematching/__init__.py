"""corematching: training-free co-adaptive token and neuron sparsity for vision-language models."""

from .errors import UnsupportedModelError
from .methods import CoreMatching, Dense, RandomTokens, UniformTokens
from .runtime import Session, SparsityRecord, sparsify
from .vqa import answer
from .zoo import load_model

__all__ = [
    "CoreMatching",
    "Dense",
    "RandomTokens",
    "Session",
    "SparsityRecord",
    "UniformTokens",
    "UnsupportedModelError",
    "answer",
    "load_model",
    "sparsify",
]
