"""Methods: each decides what to keep (core tokens, core neurons) from tensors."""

from .base import SparsityMethod, TokenBatch, TokenDecision
from .core_infer import CoreInfer
from .core_matching import CoreMatching
from .dense import Dense
from .random_tokens import RandomTokens
from .uniform_tokens import UniformTokens

__all__ = [
    "CoreInfer",
    "CoreMatching",
    "Dense",
    "RandomTokens",
    "SparsityMethod",
    "TokenBatch",
    "TokenDecision",
    "UniformTokens",
]
