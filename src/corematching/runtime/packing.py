"""Packing the tokens that survive the prune layer into a dense [B, L] layout.

Each sample keeps its own tokens, in their original order, right-aligned: the padding slots a sample needs to
reach the common width L sit at the front, so the last real token stays last (what generation reads).
Also: which packed sequence each token of a row belongs to, when several prompts share one row (padding-free
batching), so that the masks after the prune layer keep each prompt's attention inside its own block.
"""

from dataclasses import dataclass

import torch
from transformers.masking_utils import find_packed_sequence_indices


@dataclass
class PackedLayout:
    source_index: torch.Tensor  # [B, L] long: position in the full sequence of the token in each slot
    slot_valid: torch.Tensor  # [B, L] bool: False for padding slots
    all_valid: bool  # no padding slot at all (known on the host)

    @property
    def width(self) -> int:
        return self.source_index.shape[1]


def pack_kept_tokens(keep: torch.Tensor) -> PackedLayout:
    """Layout of the kept tokens keep [B, T] (bool).

    Padding slots point at the sample's first kept token, so that every slot holds finite values.
    """
    batch, length = keep.shape
    counts = keep.sum(1)  # [B]
    # The packed width is a shape, so it has to reach the host: the one sync of token removal.
    widest, narrowest = torch.stack([counts.max(), counts.min()]).tolist()
    width = max(int(widest), 1)
    padding = width - counts  # [B] padding slots in front
    slot = keep.long().cumsum(1) - 1 + padding.unsqueeze(1)  # [B, T] slot of each kept token
    slot = torch.where(keep, slot, width)  # dropped tokens go to a spare column
    positions = torch.arange(length, device=keep.device).expand(batch, length)
    source = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
    source = source.scatter_(1, slot, positions)[:, :width]
    slot_valid = torch.arange(width, device=keep.device).unsqueeze(0) >= padding.unsqueeze(1)
    first_kept = source.gather(1, padding.clamp(max=width - 1).unsqueeze(1))  # [B, 1]
    source = torch.where(slot_valid, source, first_kept)
    return PackedLayout(source_index=source, slot_valid=slot_valid, all_valid=int(narrowest) == width)


def packed_sequence_ids(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """[B, T] long: which of the sequences packed into a row each token belongs to (0, 1, ...), from the position
    ids [B or 1, T] a decoder layer received; None when no row holds more than one sequence.

    A new sequence starts wherever the position does not follow the previous one by 1 (padding-free batching:
    several prompts concatenated in one row, positions restarting at 0 for each). This is transformers' own rule
    (masking_utils.find_packed_sequence_indices), which its masks apply only when a call has neither a 2-D
    attention mask nor a cache; the caller checks that.
    """
    if position_ids is None or position_ids.dim() != 2:
        return None
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    return find_packed_sequence_indices(position_ids)
