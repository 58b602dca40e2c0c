"""TEAL: magnitude-based activation sparsity in the FFNs while decoding.

Liu et al., "Training-Free Activation Sparsity in Large Language Models" (ICLR 2025). Each FFN input entry x_i of a
decoded token with |x_i| <= t is set to 0 before gate/up, and each entry a_n of the activation entering down_proj
with |a_n| <= t' likewise; t and t' are per-layer magnitude thresholds chosen so that a share `sparsity` of the
entries of calibration tokens falls below them.
Calibration is explicit: inside the session, `session.calibrate(**calibration_batch)` runs one prefill of a few
representative prompts, and each layer's thresholds come from the real tokens it sees there. They are kept on
this TEAL instance, per FFN module of the model (so one instance serves several models, each with its own), for
every later session with the instance; calibrating again replaces them. Decoding before calibration is refused
(cm.UnsupportedModeError); prefill itself runs dense and needs none. No call other than `calibrate` changes them,
so answers never depend on which request came first.
Simplified: TEAL also sparsifies the attention projections' inputs and calibrates on a large corpus; here the FFN
only, from the calibration prefill. The zeros are applied by masking: they save no time without sparse kernels.
"""

import weakref
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModeError
from .base import SparsityMethod, check_layer_list, check_ratio


def magnitude_threshold(values: torch.Tensor, sparsity: float) -> float:
    """The threshold t with a share `sparsity` of values' entries at |v| <= t (the k-th smallest |v|, k rounded);
    -1 when k is 0 (nothing zeroed)."""
    flat = values.detach().abs().reshape(-1).float()
    count = int(round(sparsity * flat.numel()))
    if count == 0:
        return -1.0
    return float(flat.kthvalue(count).values)


def ffn_input_and_activation(ffn, hidden: torch.Tensor, input_threshold: float | None = None):
    """(the FFN input after thresholding, a(x) of it): a = act(gate(x)) * up(x), or act(up(x)) without a gate."""
    if input_threshold is not None:
        hidden = hidden * (hidden.abs() > input_threshold).to(hidden.dtype)
    if ffn.gate is None:
        return hidden, ffn.act(ffn.up(hidden))
    return hidden, ffn.act(ffn.gate(hidden)) * ffn.up(hidden)


@dataclass
class TEAL(SparsityMethod):
    """sparsity: share of FFN input and activation entries zeroed per decoded token, in (0, 1);
    layers: the layers sparsified (None: every layer)."""

    sparsity: float = 0.5
    layers: list[int] | None = None

    def __post_init__(self):
        check_ratio("sparsity", self.sparsity)
        if self.sparsity >= 1:
            raise ValueError(f"sparsity must be below 1 (1 would zero every FFN input), got {self.sparsity!r}")
        check_layer_list("layers", self.layers)
        # FFN module -> (threshold on |x|, threshold on |a|), set by calibrate_ffn (not a field: copies and
        # dataclasses.replace start uncalibrated)
        self._thresholds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        """Pickled without thresholds (they belong to modules of one process's model)."""
        return {key: value for key, value in self.__dict__.items() if key != "_thresholds"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thresholds = weakref.WeakKeyDictionary()

    def applies_to_text(self) -> bool:
        return True

    def decode_ffn_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else check_layer_list("layers", self.layers)

    def check_layers(self, num_layers: int) -> None:
        outside = [layer for layer in self.decode_ffn_layers(num_layers) if layer >= num_layers]
        if outside:
            raise ValueError(f"layers {outside} are out of range: the language model has {num_layers} layers")

    def thresholds(self, ffn_module: torch.nn.Module) -> tuple[float, float] | None:
        """(t on |x|, t' on |a|) of an FFN module (e.g. `layers[3].mlp`), or None before calibration."""
        return self._thresholds.get(ffn_module)

    def needs_calibration(self) -> bool:
        return True

    def calibrate_ffn(self, layer, ffn, hidden, token_mask) -> None:
        tokens = hidden[token_mask]  # [real tokens, H]
        if tokens.shape[0] == 0:
            raise ValueError(f"TEAL: the calibration prefill has no real token at decoder layer {layer}")
        _, activation = ffn_input_and_activation(ffn, tokens)
        thresholds = (magnitude_threshold(tokens, self.sparsity), magnitude_threshold(activation, self.sparsity))
        self._thresholds[ffn.module] = thresholds

    def decode_ffn(self, layer, ffn, hidden):
        thresholds = self.thresholds(ffn.module)
        if thresholds is None:
            raise UnsupportedModeError(
                f"TEAL decoding before calibration: decoder layer {layer} of this model has no magnitude thresholds "
                f"for {self!r}; calibrate them inside the session first, on a few representative prompts: "
                "session.calibrate(**inputs)"
            )
        input_threshold, activation_threshold = thresholds
        _, activation = ffn_input_and_activation(ffn, hidden, input_threshold)
        activation = activation * (activation.abs() > activation_threshold).to(activation.dtype)
        return ffn.down(activation)
