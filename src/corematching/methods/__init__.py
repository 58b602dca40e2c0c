"""Methods: each decides what to keep (core tokens, core neurons) from tensors."""

from .base import METHOD_INPUTS, SparsityMethod, TokenBatch, TokenDecision, instruction_mask
from .cdpruner import CDPruner
from .compose import Composed, compose
from .core_infer import CoreInfer
from .core_matching import CoreMatching
from .dart import DART
from .dense import Dense
from .divprune import DivPrune
from .fastv import FastV
from .pdrop import PDrop
from .random_tokens import RandomTokens
from .teal import TEAL
from .uniform_tokens import UniformTokens
from .visionzip import VisionZip

__all__ = [
    "CDPruner",
    "Composed",
    "CoreInfer",
    "CoreMatching",
    "DART",
    "Dense",
    "DivPrune",
    "FastV",
    "METHOD_INPUTS",
    "PDrop",
    "RandomTokens",
    "SparsityMethod",
    "TEAL",
    "TokenBatch",
    "TokenDecision",
    "UniformTokens",
    "VisionZip",
    "compose",
    "instruction_mask",
]
