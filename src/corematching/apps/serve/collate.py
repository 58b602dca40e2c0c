"""Per-request encodings (each the processor's output for one prompt and its images) -> one batch.

Each request is preprocessed once, when it arrives (its token count decides whether it fits the context); a
batch is then assembled from those encodings as the processor would have padded it: token rows padded on the
tokenizer's side (the pad token, attention 0), every other tensor (pixel values, image sizes, grids) concatenated
along its first dimension. When the other tensors cannot be concatenated (a family whose processor pads them
across the batch), `collate` returns None and the caller encodes the batch itself.
"""

from __future__ import annotations

import torch

TOKEN_ROWS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def collate(encodings: list[dict], pad_id: int, padding_side: str) -> dict | None:
    if len(encodings) == 1:
        return dict(encodings[0])
    keys = set(encodings[0])
    if any(set(encoding) != keys for encoding in encodings):
        return None
    length = max(encoding["input_ids"].shape[1] for encoding in encodings)
    batch = {}
    for key in encodings[0]:
        values = [encoding[key] for encoding in encodings]
        if not all(isinstance(value, torch.Tensor) for value in values):
            return None
        if key in TOKEN_ROWS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([pad_row(value, length, fill, padding_side) for value in values])
        elif all(value.shape[1:] == values[0].shape[1:] for value in values):
            batch[key] = torch.cat(values)
        else:
            return None
    return batch


def pad_row(row: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    """A [1, t] row padded to [1, length] on `side` ('left' or 'right')."""
    missing = length - row.shape[1]
    if missing == 0:
        return row
    padding = row.new_full((row.shape[0], missing), fill)
    return torch.cat([padding, row] if side == "left" else [row, padding], dim=1)
