"""Planning what fits: whether a model runs in a memory budget, and with which core-neuron settings.

`plan_memory(model_or_config, "12GiB", dtype="float16", method=cm.CoreMatching(...))` counts, for a batch of one
prompt (text tokens + one image) and a short answer:
  - the parameters that stay resident: attention, norms, embeddings and head, the vision tower and projector, and
    the FFNs of the layers that decode densely;
  - the core-neuron slices of the neuron layers (ceil(beta * F) rows of gate/up and columns of down per layer,
    runtime/offload.py) when their FFN originals are offloaded;
  - the transient of the streamed prefill: twice one offloaded FFN (its projections brought in, read and placed;
    a fresh process peaked about six projections above its steady state), or the slice reader's block of
    down_proj rows, whichever is larger;
  - the KV cache: every token in the layers up to the prune layer K, the kept tokens after it, plus the answer;
  - prefill activations: hidden states, the FFN intermediates, the attention scores, the method's selection
    buffers, the vision tower's and the logits;
  - the process itself (Python, torch, transformers): `runtime_bytes`.
The dense model comes first: when it fits whole, nothing is offloaded. Otherwise the FFNs of the neuron layers
(the method's, else every layer after K, else every layer) go to the offload store and the plan takes the
method's beta, or the largest smaller beta that fits. When none does, PlanError says by how much it misses and
what takes the memory.
"""

import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .methods import CoreMatching
from .models import adapter_for

BETAS_TRIED = (0.3, 0.2, 0.1)  # smaller betas tried, in order, when the method's does not fit
RUNTIME_BYTES = 512 << 20  # the process without the model: Python, torch, transformers (measured ~0.4 GiB RSS)
SLICE_READ_BLOCK = 64 << 20  # runtime/offload.py reads down_proj in blocks of rows of this size
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


class PlanError(ValueError):
    """Nothing fits in the budget; the message says what was tried and what takes the memory."""


def parse_bytes(memory: int | str) -> int:
    """12884901888, "12GiB", "12 GB" (decimal), "512MiB" -> bytes."""
    if isinstance(memory, bool) or not isinstance(memory, int | str):
        raise ValueError(f"memory must be a number of bytes or a string such as '12GiB', got {memory!r}")
    if isinstance(memory, int):
        value = memory
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", memory)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory: cannot read {memory!r}; write bytes or a size such as '12GiB' or '500MB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory must be positive, got {memory!r}")
    return value


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


@dataclass
class MemoryPlan:
    """What runs in the budget. `components` are bytes by what holds them; `method` is the method to run with
    (None when none was given and the dense model fits); `device_map` goes to from_pretrained(device_map=...)."""

    budget: int
    offload: bool  # the FFN originals of the neuron layers live in the offload store
    beta: float | None
    neuron_layers: tuple[int, ...]
    method: CoreMatching | None
    device_map: dict[str, str]
    components: dict[str, int]
    dense_bytes: int  # what the dense model needs, nothing offloaded
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def resident_parameters(self) -> int:
        """Bytes of the parameters that stay resident (everything but the offloaded FFNs)."""
        parts = ("attention and norms", "FFNs (resident)", "embeddings and head", "vision tower, projector, rest")
        return sum(self.components[part] for part in parts)

    def explain(self) -> str:
        lines = [f"budget {format_bytes(self.budget)}: fits, {format_bytes(self.total)} planned"]
        if self.offload:
            lines.append(f"FFN originals of layers {_ranges(self.neuron_layers)} offloaded; core neurons at beta "
                         f"{self.beta} resident")  # fmt: skip
        else:
            lines.append("nothing offloaded (the dense model fits)")
        lines += [f"  {name:<32}{format_bytes(size):>12}" for name, size in self.components.items()]
        lines.append(f"  (the dense model, nothing offloaded: {format_bytes(self.dense_bytes)})")
        return "\n".join(lines + self.notes)


def plan_memory(
    model_or_config,
    memory: int | str,
    dtype: str | torch.dtype = "float32",
    method: CoreMatching | None = None,
    *,
    text_tokens: int = 64,
    visual_tokens: int | None = None,
    answer_tokens: int = 32,
    device: str = "cpu",
    runtime_bytes: int = RUNTIME_BYTES,
) -> MemoryPlan:
    """Whether the model runs in `memory` (bytes or "12GiB") with `method` (a cm.CoreMatching; None: token pruning
    at the defaults, with core neurons only if they are needed to fit), for one prompt of `text_tokens` text
    tokens and one image (`visual_tokens`: the model's own count by default), answering `answer_tokens`.
    `device` is where the model computes: offloaded FFNs go to "disk" for the CPU, to "cpu" for an accelerator.
    Raises PlanError when nothing fits."""
    budget = parse_bytes(memory)
    dtype = _dtype(dtype)
    if method is not None and not isinstance(method, CoreMatching):
        raise ValueError(f"method: plans are made for cm.CoreMatching, got {type(method).__name__}")
    if min(text_tokens, answer_tokens) < 0 or (visual_tokens is not None and visual_tokens < 0):
        raise ValueError("text_tokens, visual_tokens and answer_tokens must be non-negative")
    geometry = _Geometry(_meta_model(model_or_config), dtype)
    visual = visual_tokens if visual_tokens is not None else geometry.tokens_per_image
    if visual is None:
        raise ValueError(f"{geometry.family}: the visual tokens per image vary; pass visual_tokens=")
    given = method
    method = method if method is not None else CoreMatching()
    kept_visual = _kept_visual(method.token_budget, visual)
    shared = {
        "KV cache": geometry.kv_bytes(
            text_tokens + visual, text_tokens + kept_visual, answer_tokens, method.prune_layer
        ),  # fmt: skip
        "prefill activations": geometry.activation_bytes(text_tokens + visual, visual),
        "runtime (Python, torch)": runtime_bytes,
    }
    dense = {**geometry.parameter_parts(()), **shared}
    dense_bytes = sum(dense.values())
    if dense_bytes <= budget:
        layers = tuple(method.neuron_layer_indices(geometry.num_layers))
        map_ = {"": device}
        return MemoryPlan(budget, False, method.beta if layers else None, layers, given, map_, dense, dense_bytes)
    tried = []
    for layers in _layer_sets(method, geometry.num_layers):
        for beta in (method.beta, *(b for b in BETAS_TRIED if b < method.beta)):
            components = geometry.offloaded_components(layers, beta, shared)
            tried.append((sum(components.values()), layers, beta, components))
            if tried[-1][0] <= budget:
                chosen = replace(method, beta=beta, neuron_layers=list(layers))
                notes = []
                if beta != method.beta:
                    notes.append(f"beta lowered from {method.beta} to {beta} to fit; check its quality (cm.calibrate)")
                device_map = geometry.device_map(layers, device, "disk" if device == "cpu" else "cpu")
                return MemoryPlan(budget, True, beta, layers, chosen, device_map, components, dense_bytes, notes)
    smallest, layers, beta, components = min(tried, key=lambda entry: entry[0])
    table = "\n".join(f"  {name:<32}{format_bytes(size):>12}" for name, size in components.items())
    largest = max(components, key=components.get)
    raise PlanError(
        f"the model does not fit in {format_bytes(budget)}: dense it needs {format_bytes(dense_bytes)}, and the "
        f"smallest plan tried (FFNs of layers {_ranges(layers)} offloaded, core neurons at beta {beta}) needs "
        f"{format_bytes(smallest)}, {format_bytes(smallest - budget)} over:\n{table}\n"
        f"the largest part is the {largest}; a smaller dtype or a larger budget would help"
    )


# ---------------------------------------------------------------------------------------------- geometry


class _Geometry:
    """Parameter and tensor sizes of one model, counted on its (meta) modules."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        adapter = adapter_for(model)
        self.model, self.family, self.dtype = model, adapter.family, dtype
        self.size = torch.empty((), dtype=dtype).element_size()
        self.num_layers = adapter.num_layers
        self.tokens_per_image = adapter.tokens_per_image
        self.ffns = {layer: adapter.ffn(layer) for layer in range(self.num_layers)}
        names = {id(module): name for name, module in model.named_modules()}
        self.ffn_names = {layer: names[id(parts.module)] for layer, parts in self.ffns.items()}
        self.all_parameters = self._bytes(model)
        self.decoder_bytes = sum(self._bytes(layer) for layer in adapter.decoder_layers)
        self.ffn_bytes = {layer: self._bytes(parts.module) for layer, parts in self.ffns.items()}
        embeddings = {id(p): p for p in model.get_input_embeddings().parameters()}
        head = model.get_output_embeddings()
        embeddings.update({id(p): p for p in (head.parameters() if head is not None else ())})  # tied: counted once
        self.embedding_bytes = sum(p.numel() for p in embeddings.values()) * self.size
        text = model.config.get_text_config()
        self.hidden = text.hidden_size
        self.heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(text, "head_dim", None) or self.hidden // self.heads
        self.vocab = text.vocab_size
        self.width = max(parts.up.out_features for parts in self.ffns.values())
        vision = getattr(model.config, "vision_config", None)
        self.vision_hidden = getattr(vision, "hidden_size", 0) or 0
        self.vision_width = getattr(vision, "intermediate_size", 0) or 0
        self.vision_heads = getattr(vision, "num_attention_heads", 1) or 1

    def _bytes(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * self.size

    def parameter_parts(self, offloaded: tuple[int, ...]) -> dict[str, int]:
        """Resident parameter bytes by part, the FFNs of the `offloaded` layers left out."""
        ffns = sum(self.ffn_bytes.values())
        return {
            "attention and norms": self.decoder_bytes - ffns,
            "FFNs (resident)": ffns - sum(self.ffn_bytes[layer] for layer in offloaded),
            "embeddings and head": self.embedding_bytes,
            "vision tower, projector, rest": self.all_parameters - self.decoder_bytes - self.embedding_bytes,
        }

    def offloaded_components(self, layers: tuple[int, ...], beta: float, shared: dict) -> dict[str, int]:
        slices = 0
        transient = 0
        for layer in layers:
            parts = self.ffns[layer]
            width, hidden = parts.up.out_features, parts.up.in_features
            core = math.ceil(beta * width)
            projections = 2 if parts.gate is not None else 1
            slices += (projections * core * hidden + hidden * core) * self.size
            biased = [linear is not None and linear.bias is not None for linear in (parts.up, parts.gate)]
            slices += (sum(biased) * core + (hidden if parts.down.bias is not None else 0)) * self.size
            projection = width * hidden * self.size
            reader = min(SLICE_READ_BLOCK, projection) + hidden * core * self.size  # a block of down rows, the slice
            transient = max(transient, 2 * (projections + 1) * projection, reader)
        return {
            **self.parameter_parts(layers),
            "core slices": slices,
            "streamed FFN (transient)": transient,
            **shared,
        }

    def kv_bytes(self, prompt: int, kept: int, answer: int, prune_layer: int) -> int:
        per_token = 2 * self.kv_heads * self.head_dim * self.size
        lower = min(max(prune_layer + 1, 0), self.num_layers)
        return per_token * (lower * (prompt + answer) + (self.num_layers - lower) * (kept + answer))

    def activation_bytes(self, tokens: int, visual: int) -> int:
        """Prefill activations alive at once (an estimate that errs high): the residual stream and attention
        inputs (6 x [T, H]), the FFN intermediates and the method's selection buffers (5 x [T, F]), one head's
        worth of attention scores per head ([heads, T, T]), the last token's logits, and the vision tower's
        stream, intermediates and scores."""
        text = tokens * (6 * self.hidden + 5 * self.width) + self.heads * tokens * tokens + 2 * self.vocab
        vision = visual * (6 * self.vision_hidden + 2 * self.vision_width) + self.vision_heads * visual * visual
        return (text + vision) * self.size

    def device_map(self, layers: tuple[int, ...], device: str, store: str) -> dict[str, str]:
        """The smallest device map with the FFN modules of `layers` on `store` and every other parameter on
        `device`: modules without an offloaded FFN inside map whole."""
        targets = {self.ffn_names[layer] for layer in layers}
        device_map = {}

        def place(name: str, module: nn.Module) -> None:
            if name in targets:
                device_map[name] = store
                return
            prefix = f"{name}." if name else ""
            if not any(target.startswith(prefix) for target in targets):
                device_map[name] = device
                return
            for param_name, _ in module.named_parameters(recurse=False):
                device_map[prefix + param_name] = device
            for buffer_name, _ in module.named_buffers(recurse=False):
                device_map[prefix + buffer_name] = device
            for child_name, child in module.named_children():
                place(prefix + child_name, child)

        place("", self.model)
        return device_map


def _meta_model(model_or_config) -> nn.Module:
    """A model to count on: the model itself, or one built on the meta device from a config (or a local path's)."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

    config = model_or_config
    if isinstance(config, str):
        config = AutoConfig.from_pretrained(config, local_files_only=True)
    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"model_or_config: expected a model, a transformers config or a local path, got {config!r}")
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point dtype such as 'float16', got {dtype!r}")
    return found


def _kept_visual(token_budget, visual: int) -> int:
    if token_budget is None:
        return visual  # the elbow rule keeps an unknown share: plan for all
    if isinstance(token_budget, float):
        return math.ceil(token_budget * visual)
    return min(token_budget, visual)


def _layer_sets(method: CoreMatching, num_layers: int):
    """The neuron layers tried: the method's own, else every layer after K; then every layer."""
    own = tuple(method.neuron_layer_indices(num_layers))
    after = tuple(range(method.prune_layer + 1, num_layers))
    every = tuple(range(num_layers))
    seen = []
    for layers in (own or after, every):
        if layers and layers not in seen:
            seen.append(layers)
            yield layers


def _ranges(layers) -> str:
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))
