"""Attention masks for the layers after the prune layer, in the format each attention implementation takes."""

import torch


def packed_attention_mask(
    key_valid: torch.Tensor,
    num_queries: int,
    implementation: str,
    dtype: torch.dtype,
    all_valid: bool,
    mask_length: int | None = None,
) -> torch.Tensor | None:
    """Mask [B, 1, q, mask_length] for q queries that are the last q of K keys, key_valid [B, K] (bool).

    Query i sees key j when the key is valid and j <= K - q + i (causal in the packed order, which is the
    original order). A query whose own slot is padding also sees itself, so that no row is empty (an empty
    row would give NaN that then leaks through the values). Keys K..mask_length-1 (the unused tail of a static
    cache's buffer) are never seen. For sdpa, None is returned when every key is valid and sdpa's own causal
    rule is exact (q == 1 or q == K, no unused tail). Eager takes an additive float mask.
    """
    batch, num_keys = key_valid.shape
    mask_length = num_keys if mask_length is None else mask_length
    exact_without_mask = all_valid and mask_length == num_keys and (num_queries == 1 or num_queries == num_keys)
    if implementation == "sdpa" and exact_without_mask:
        return None
    device = key_valid.device
    if mask_length > num_keys:
        unused = torch.zeros(batch, mask_length - num_keys, dtype=torch.bool, device=device)
        key_valid = torch.cat([key_valid, unused], dim=1)
    query_at = torch.arange(num_queries, device=device) + (num_keys - num_queries)  # [q] key index of each query
    key_at = torch.arange(mask_length, device=device)
    causal = key_at.unsqueeze(0) <= query_at.unsqueeze(1)  # [q, mask_length]
    itself = key_at.unsqueeze(0) == query_at.unsqueeze(1)  # [q, mask_length]
    allowed = (causal.unsqueeze(0) & key_valid.unsqueeze(1)) | itself.unsqueeze(0)  # [B, q, mask_length]
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        blocked = torch.finfo(dtype).min
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked)
    return allowed


def padding_mask_from_4d(mask: torch.Tensor, past: int, num_queries: int) -> torch.Tensor | None:
    """The 2-D padding mask [B, past + q] (bool) behind a 4-D causal padding mask [B, 1, q, kv] (bool, or additive
    float), as generate() builds for static caches; None when the mask is anything else (a custom mask)."""
    if mask.dim() != 4 or mask.shape[2] != num_queries or mask.shape[-1] < past + num_queries:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[:, 0, :, : past + num_queries]  # [B, q, past + q]
    valid = allowed[:, -1, :]  # the last query is a real token: it sees exactly the valid keys
    query_at = torch.arange(num_queries, device=mask.device).unsqueeze(1) + past
    causal = torch.arange(past + num_queries, device=mask.device).unsqueeze(0) <= query_at  # [q, past + q]
    standard = causal.unsqueeze(0) & valid.unsqueeze(1)
    real_queries = valid[:, past:].unsqueeze(-1)  # [B, q, 1] rows of padding queries are not compared
    if not bool(((allowed == standard) | ~real_queries).all()):
        return None
    return valid


def upper_attention_mask(
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    num_queries: int,
    rule,
    query_group: torch.Tensor | None,
    implementation: str,
    dtype: torch.dtype,
    all_valid: bool,
    mask_length: int | None = None,
    key_sequence: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Mask [B, 1, q, mask_length] of a layer after the prune layer: the queries are the last q of the keys
    key_index [B, K] (full-sequence indices, increasing) with validity key_valid [B, K].

    The rule (an AttentionRule) is applied on the original indices, as the dense model applies it: causal, and,
    for bidirectional images, every query of an image (query_group [B, q]: image per query, -1 for text) also
    sees the keys of its own image among the new tokens; then the sliding window, when there is one, limits both
    to keys less than `window` behind the query (i - j < window; later keys of the query's own image stay
    visible), as transformers composes them (sliding window AND (causal OR image block)). With key_sequence [B, K]
    (the packed sequence of each key, when several prompts share a row: runtime/packing.py), a query sees only the
    keys of its own sequence, as transformers' masks do for packed rows. A plain causal rule without packed
    sequences is the packed_attention_mask above.
    """
    window = rule.sliding_window
    bidirectional = rule.bidirectional_images and query_group is not None
    if window is None and not bidirectional and key_sequence is None:
        return packed_attention_mask(key_valid, num_queries, implementation, dtype, all_valid, mask_length)
    batch, num_keys = key_index.shape
    mask_length = num_keys if mask_length is None else mask_length
    device = key_index.device
    query_index = key_index[:, num_keys - num_queries :]  # [B, q]
    distance = query_index.unsqueeze(2) - key_index.unsqueeze(1)  # [B, q, K]
    pattern = distance >= 0
    if bidirectional:
        text = torch.full((batch, num_keys - num_queries), -1, dtype=query_group.dtype, device=device)
        key_group = torch.cat([text, query_group], dim=1)  # [B, K]
        pattern |= (query_group.unsqueeze(2) == key_group.unsqueeze(1)) & (query_group >= 0).unsqueeze(2)
    if window is not None:
        pattern &= distance < window
    if key_sequence is not None:
        query_sequence = key_sequence[:, num_keys - num_queries :]  # [B, q]
        pattern &= query_sequence.unsqueeze(2) == key_sequence.unsqueeze(1)
    allowed = pattern & key_valid.unsqueeze(1)
    itself = torch.arange(num_keys, device=device).unsqueeze(0) == (
        torch.arange(num_queries, device=device) + num_keys - num_queries
    ).unsqueeze(1)
    allowed |= itself.unsqueeze(0)
    if mask_length > num_keys:
        unused = torch.zeros(batch, num_queries, mask_length - num_keys, dtype=torch.bool, device=device)
        allowed = torch.cat([allowed, unused], dim=2)
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
    return allowed
