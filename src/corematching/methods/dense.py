"""Dense: the unchanged model, on the same interface as the sparse methods."""

from dataclasses import dataclass

from .base import SparsityMethod


@dataclass
class Dense(SparsityMethod):
    """Keeps every token and every neuron."""
