"""The mechanics that carry a method's decisions out: the session, token removal, core-neuron decoding."""

from .records import SparsityRecord
from .session import Session, sparsify

__all__ = ["Session", "SparsityRecord", "sparsify"]
