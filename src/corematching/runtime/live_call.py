"""A running call: its plan (call_plan.py) and what each room has done in it so far.

`LiveCall` holds three parts, each with what only its room reads and writes:
  plan      the CallPlan, decided at the call's start and never changed;
  tokens    TokenProgress: the prune stages reached (StageCall: the kept tokens' layout, keys, masks, positions),
            what the method asked for (caught by method_inputs.py), and the tokens kept (token_removal.py);
  neurons   NeuronChoice: a fresh call's core neurons, chosen in its neuron layers (core_decoding.py).
Token tensors cover the call's new tokens, [B, q], or those the current layers see, [B, q'].
"""

from dataclasses import dataclass, field

import torch

from .call_plan import CallPlan
from .packing import PackedLayout


@dataclass
class StageCall:
    """One prune stage of a call: the call's new tokens its layers (after the stage's layer) see."""

    layout: PackedLayout | None  # the new tokens kept so far, indexed in the call (None: all of them, in place)
    keys: tuple | None = None  # (key index [B, K], key valid [B, K], all valid, new tokens' image [B, q'])
    inputs: dict = field(default_factory=dict)  # position ids gathered at the kept tokens
    embeddings: list = field(default_factory=list)  # [(position embeddings some layer got, them gathered)]
    masks: dict = field(default_factory=dict)  # attention rule -> mask of this stage's layers with that rule
    hidden_index: torch.Tensor | None = None  # [B, L] slots of the previous stage's tokens to gather (None: none)


@dataclass
class TokenProgress:
    """The token room's state in one call: the stages reached and what the choice of tokens left."""

    stages: list[StageCall] = field(default_factory=list)
    sequences: torch.Tensor | None = None  # [B, q] packed sequence of each new token (None: one per row)
    prune_activations: torch.Tensor | None = None  # [B, q', F] at a stage's layer, until its tokens are chosen
    captured: dict = field(default_factory=dict)  # what the method asked for, caught on the way (method_inputs.py)
    merged_hidden: torch.Tensor | None = None  # [B, q', H] new hidden states of kept tokens entering a stage
    keep: torch.Tensor | None = None  # [B, q] bool: new tokens that go past the last stage chosen
    stage_keeps: list = field(default_factory=list)  # per stage chosen: [B, q] bool, past that stage
    scores: torch.Tensor | None = None  # the first stage's token scores


@dataclass
class NeuronChoice:
    """A fresh call's core neurons, chosen in the neuron layers."""

    chosen: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # [B] bool rows whose neurons are chosen


@dataclass
class LiveCall:
    plan: CallPlan
    tokens: TokenProgress = field(default_factory=TokenProgress)
    neurons: NeuronChoice = field(default_factory=NeuronChoice)

    @property
    def layout(self) -> PackedLayout | None:
        """The layout of the new tokens the current layers see (None: all of them, in place)."""
        stages = self.tokens.stages
        return stages[-1].layout if stages else None

    def current(self, per_token: torch.Tensor) -> torch.Tensor:
        """per_token [B, q] over the call's tokens -> [B, q'] over those the current layers see."""
        layout = self.layout
        return per_token if layout is None else per_token.gather(1, layout.source_index)

    @property
    def current_valid(self) -> torch.Tensor:
        """[B, q'] bool: real tokens among those the current layers see."""
        layout = self.layout
        return self.plan.valid if layout is None else layout.slot_valid

    @property
    def decision_valid(self) -> torch.Tensor:
        """[B, q'] bool: the real tokens the method decides on among those the current layers see: all but
        assisted decoding's candidates, which are decoded, not prefilled."""
        if self.plan.candidates is None:
            return self.current_valid
        return self.current_valid & ~self.current(self.plan.candidates)
