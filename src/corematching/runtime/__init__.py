"""The mechanics that carry a method's decisions out: the session, token removal, core-neuron decoding, and
decode batches that conversations join and leave (batching.py)."""

from .batching import DecodeBatch, kv_bytes, merge_batches, prefill_batch
from .records import SparsityRecord
from .session import Session, sparsify

__all__ = ["DecodeBatch", "Session", "SparsityRecord", "kv_bytes", "merge_batches", "prefill_batch", "sparsify"]
