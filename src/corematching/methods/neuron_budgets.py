"""Per-layer neuron budgets: the `Calibration` record that `cm.calibrate` measures, and the reader that turns it
(or its JSON file, or a plain dict) into {layer: share of the FFN width kept while decoding}.

This is plain data, with no model in sight: methods read budgets from here, and `corematching.calibrate` (the tool
that runs a model to measure them) writes them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1


@dataclass
class Calibration:
    """Per-layer budgets (share of the FFN width each layer decodes with) and how they were measured."""

    budgets: dict[int, float]  # layer -> share of neurons kept while decoding; absent layers decode densely
    rule: str  # the neuron rule the budgets were measured with (neuron_rules.RULES)
    tolerance: float  # allowed relative perplexity increase on the calibration prompts
    flops_saved: float  # share of decode FFN FLOPs saved, over all layers
    perplexity_increase: float  # measured on the calibration prompts with all budgets at once
    model: str = ""  # fingerprint of the model the budgets belong to
    num_layers: int = 0
    sensitivity: dict[int, dict[float, float]] = field(default_factory=dict)  # layer -> share -> NLL increase
    version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["budgets"] = {str(layer): share for layer, share in self.budgets.items()}
        data["sensitivity"] = {str(layer): {str(share): value for share, value in row.items()}
                               for layer, row in self.sensitivity.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        data = dict(data)
        data["budgets"] = {int(layer): float(share) for layer, share in data["budgets"].items()}
        data["sensitivity"] = {int(layer): {float(share): float(value) for share, value in row.items()}
                               for layer, row in data.get("sensitivity", {}).items()}
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_json(json.loads(Path(path).read_text()))


def read_budgets(value, name: str = "neuron_budgets") -> dict[int, float]:
    """Budgets {layer: share in (0, 1]} from a Calibration, its JSON path, its JSON dict or a plain dict.

    Raises ValueError naming `name` when the value cannot be read or holds a bad layer or share.
    """
    if isinstance(value, Calibration):
        raw = value.budgets
    elif isinstance(value, (str, os.PathLike)):
        try:
            raw = json.loads(Path(value).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{name}: cannot read calibration JSON {str(value)!r}: {error}") from None
        raw = raw.get("budgets") if isinstance(raw, dict) else raw
    elif isinstance(value, dict):
        raw = value.get("budgets", value) if "budgets" in value else value
    else:
        raise ValueError(f"{name} must be a dict {{layer: share}}, a Calibration or a path to one, got {value!r}")
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: expected a mapping of layer -> share, got {raw!r}")
    budgets = {}
    for layer, share in raw.items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: layer {layer!r} is not an int") from None
        if isinstance(layer, bool) or index < 0 or str(index) != str(layer).strip():
            raise ValueError(f"{name}: layer {layer!r} is not a non-negative int")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < float(share) <= 1:
            raise ValueError(f"{name}: the share of layer {index} must be a number in (0, 1], got {share!r}")
        budgets[index] = float(share)
    return dict(sorted(budgets.items()))
