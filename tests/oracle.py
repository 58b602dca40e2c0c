"""The oracle every sparsified run must equal, for any model family and method: the dense model, untouched
except that
  - from layer K+1 on, attention to the removed tokens is blocked in the attention mask (positions, caches and
    everything else stay as in the dense model); with several prune stages, from each stage's layer + 1 on the
    tokens that stage removed, and
  - while decoding (tokens at sequence index >= decode_from), the FFN activation of the neuron layers is zeroed
    outside the sample's core neurons.
It runs through the model's own forward and generate (any cache kind, sampling, beam search, assisted
decoding), with hooks of its own; it shares no code with the runtime.
"""

from contextlib import contextmanager

import torch


def _rows(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample rows repeated for beams / expanded batches: [B0, ...] -> [batch, ...]."""
    if values.shape[0] == batch:
        return values
    assert batch % values.shape[0] == 0, (batch, values.shape)
    return values.repeat_interleave(batch // values.shape[0], dim=0)


def _allowed(mask, batch: int, num_queries: int, past: int, device, kv: int) -> torch.Tensor:
    """The dense model's own mask of one layer as bool [B, 1, q, kv] (kv: the keys attention will see)."""
    if mask is None:
        query_at = torch.arange(num_queries, device=device).unsqueeze(1) + past
        allowed = torch.arange(kv, device=device).unsqueeze(0) <= query_at
        return allowed.view(1, 1, num_queries, kv).expand(batch, 1, num_queries, kv)
    if mask.dtype == torch.bool:
        return mask.expand(batch, *mask.shape[1:])
    return (mask == 0).expand(batch, *mask.shape[1:])


@contextmanager
def masked_reference(
    language_model,
    ffns: dict,
    removed: torch.Tensor | dict,
    prune_layer: int | None,
    core_neurons: list[dict] | None = None,
    decode_from: int | None = None,
    attn: str = "sdpa",
):
    """Patch the dense model into the oracle for the duration of the block.

    language_model: the decoder (e.g. model.model.language_model) whose layers are `.layers`.
    ffns: {layer: mlp module with gate_proj/up_proj/down_proj/act_fn} for the layers whose FFN is zeroed.
    removed: bool [B0, N] over full-sequence indices (N at least the longest sequence; beams repeat rows), blocked
    after prune_layer; or {prune layer: such a mask} for several stages (prune_layer is then ignored).
    core_neurons: per sample {layer: LongTensor of kept neurons} (an empty dict: dense), or None.
    """
    handles, replaced = [], []
    call = {}

    def on_language_model(module, args, kwargs):
        cache = kwargs.get("cache")
        call["past"] = int(cache.get_seq_length()) if cache is not None else 0

    handles.append(language_model.register_forward_pre_hook(on_language_model, with_kwargs=True))

    def on_layer(module, args, kwargs, removed):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, num_queries = hidden.shape[:2]
        past = call["past"]
        cache = kwargs.get("cache")
        kv, offset = past + num_queries, 0  # key j of the attention is sequence index offset + j
        if cache is not None:
            kv, offset = (int(v) for v in cache.get_mask_sizes(num_queries, module.self_attn.layer_idx))
        allowed = _allowed(kwargs.get("attention_mask"), batch, num_queries, past - offset, hidden.device, kv)
        allowed = allowed.clone()
        kv = allowed.shape[-1]
        blocked = torch.zeros(batch, kv, dtype=torch.bool, device=hidden.device)
        rows = _rows(removed, batch)[:, offset:]
        width = min(kv, rows.shape[1])
        blocked[:, :width] = rows[:, :width]
        allowed &= ~blocked.view(batch, 1, 1, kv)
        queries = torch.arange(num_queries, device=hidden.device)
        allowed[:, :, queries, queries + past - offset] = True  # every token sees itself
        if attn == "eager":
            mask = torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
        else:
            mask = allowed
        return args, {**kwargs, "attention_mask": mask}

    if not isinstance(removed, dict):
        removed = {} if prune_layer is None else {prune_layer: removed}
    for index, layer in enumerate(language_model.layers):
        blocked_here = [mask for stage_layer, mask in removed.items() if index > stage_layer]
        if blocked_here:
            union = torch.stack(blocked_here).any(0)

            def hook(module, args, kwargs, union=union):
                return on_layer(module, args, kwargs, union)

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def zeroed_forward(mlp, layer):
        def forward(hidden):
            activation = mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden)
            batch, num_queries = hidden.shape[:2]
            samples = core_neurons if len(core_neurons) == batch else [
                c for c in core_neurons for _ in range(batch // len(core_neurons))
            ]
            index = torch.arange(num_queries, device=hidden.device) + call["past"]
            decoding = index >= decode_from  # [q]
            keep = torch.ones(batch, activation.shape[-1], dtype=torch.bool, device=hidden.device)
            for row, sample in enumerate(samples):
                if layer in sample:
                    keep[row] = False
                    keep[row, sample[layer]] = True
            zero = decoding.view(1, -1, 1) & ~keep.unsqueeze(1)
            return mlp.down_proj(activation.masked_fill(zero, 0.0))

        return forward

    if core_neurons:
        for layer, mlp in ffns.items():
            replaced.append(mlp)
            mlp.forward = zeroed_forward(mlp, layer)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for mlp in replaced:
            del mlp.forward


def removed_mask(keep_mask: torch.Tensor, visual_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, length]: visual tokens not kept, from a record's masks (padded with False)."""
    removed = torch.zeros(keep_mask.shape[0], length, dtype=torch.bool)
    removed[:, : keep_mask.shape[1]] = visual_mask & ~keep_mask
    return removed
