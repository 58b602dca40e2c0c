"""What one prefill decided, as `session.last` shows it. Lists and dicts are built on first access, so the
forward pass itself never waits for them."""

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class SparsityRecord:
    method: str  # the method's class name
    prune_layer: int | None  # the layer after which tokens were removed (None: none removed)
    keep_mask: torch.Tensor  # [B, T] bool: tokens of input_ids that go past the (last) prune layer
    visual_mask: torch.Tensor  # [B, T] bool: visual tokens of input_ids
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, k] sorted core neurons
    token_scores: torch.Tensor | None = None  # [B, T] the method's scores, when it has any
    neuron_rows: torch.Tensor | None = None  # [B] bool: samples that decode with their core neurons
    stage_keep_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # prune layer -> [B, T] bool: tokens
    #   that go past that layer, for every prune stage (one for most methods; keep_mask is the last one's)
    resident_slice_bytes: int | None = None  # offloaded FFNs: memory of the core-neuron slices read for decoding
    slice_bytes_read: int | None = None  # offloaded FFNs: bytes read from the offload store to build them

    @property
    def batch_size(self) -> int:
        return self.keep_mask.shape[0]

    @cached_property
    def kept_positions(self) -> list[torch.Tensor]:
        """Per sample: sorted positions of input_ids that go past the prune layer (1-D LongTensor)."""
        return [row.nonzero().squeeze(1) for row in self.keep_mask]

    @cached_property
    def visual_positions(self) -> list[torch.Tensor]:
        """Per sample: sorted positions of the visual tokens."""
        return [row.nonzero().squeeze(1) for row in self.visual_mask]

    @cached_property
    def kept_visual_positions(self) -> list[torch.Tensor]:
        """Per sample: sorted positions of the visual tokens that were kept."""
        return [row.nonzero().squeeze(1) for row in self.keep_mask & self.visual_mask]

    @cached_property
    def core_neurons_per_sample(self) -> list[dict[int, torch.Tensor]]:
        """Per sample: {layer: sorted 1-D LongTensor of the neurons used while decoding}; empty for a sample
        that decodes densely (one without visual tokens). The same shape at every batch size."""
        rows = self.neuron_rows if self.neuron_rows is not None else self.visual_mask.any(1)
        sparse_rows = rows.tolist()
        return [
            {layer: per_row[b] for layer, per_row in self.neurons.items()} if sparse_rows[b] else {}
            for b in range(self.batch_size)
        ]

    def core_neurons_of(self, sample: int) -> dict[int, torch.Tensor]:
        """Sample `sample`'s {layer: sorted 1-D LongTensor of the neurons used while decoding}, at any batch size
        (empty when that sample decodes densely)."""
        if not 0 <= sample < self.batch_size:
            raise IndexError(f"sample {sample} is out of range: the batch has {self.batch_size} samples")
        return self.core_neurons_per_sample[sample]

    @cached_property
    def core_neurons(self) -> dict[int, torch.Tensor]:
        """{layer: core neurons used while decoding}, shaped by the batch size:

        - a batch of 1: each value is the sample's sorted 1-D LongTensor [k] (empty dict when it decodes densely);
        - a larger batch: each value is a LongTensor [B, k], row b being sample b's sorted set (the row of a
          sample without visual tokens is unused, as that sample decodes densely).

        `core_neurons_of(b)` (or `core_neurons_per_sample[b]`) gives one sample's 1-D sets at every batch size.
        """
        if self.batch_size == 1:
            return self.core_neurons_of(0)
        return dict(self.neurons)
