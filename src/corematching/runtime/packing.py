"""Packing the tokens that survive the prune layer into a dense [B, L] layout.

Each sample keeps its own tokens, in their original order, right-aligned: the padding slots a sample needs to
reach the common width L sit at the front, so the last real token stays last (what generation reads).
"""

from dataclasses import dataclass

import torch


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
