"""corematching: training-free co-adaptive token and neuron sparsity for vision-language models."""

from .errors import UnsupportedModeError, UnsupportedModelError
from .methods import CoreInfer, CoreMatching, Dense, RandomTokens, UniformTokens
from .models import supported_models
from .runtime import Session, SparsityRecord, sparsify
from .vqa import answer
from .zoo import load_model

__all__ = [
    "CoreInfer",
    "CoreMatching",
    "Dense",
    "RandomTokens",
    "Session",
    "SparsityRecord",
    "UniformTokens",
    "UnsupportedModeError",
    "UnsupportedModelError",
    "answer",
    "load_model",
    "sparsify",
    "supported_models",
]
