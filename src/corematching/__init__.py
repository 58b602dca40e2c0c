"""corematching: training-free co-adaptive token and neuron sparsity for vision-language models."""

from . import selection
from .calibrate import Calibration, calibrate
from .errors import UnsupportedModeError, UnsupportedModelError
from .methods import (
    DART,
    TEAL,
    CDPruner,
    CoreInfer,
    CoreMatching,
    Dense,
    DivPrune,
    FastV,
    PDrop,
    RandomTokens,
    SparsityMethod,
    TokenBatch,
    TokenDecision,
    UniformTokens,
    VisionZip,
    compose,
)
from .models import supported_models
from .runtime import Session, SparsityRecord, sparsify
from .vqa import answer
from .zoo import load_model

__all__ = [
    "Calibration",
    "CDPruner",
    "DART",
    "DivPrune",
    "FastV",
    "PDrop",
    "SparsityMethod",
    "TEAL",
    "TokenBatch",
    "TokenDecision",
    "VisionZip",
    "compose",
    "selection",
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
    "calibrate",
    "load_model",
    "sparsify",
    "supported_models",
]
