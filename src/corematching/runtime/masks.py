"""Attention masks for the layers after the prune layer, in the format each attention implementation takes."""

import torch


def packed_attention_mask(
    key_valid: torch.Tensor, num_queries: int, implementation: str, dtype: torch.dtype, all_valid: bool
) -> torch.Tensor | None:
    """Mask [B, 1, q, K] for q queries that are the last q of K keys, key_valid [B, K] (bool).

    Query i sees key j when the key is valid and j <= K - q + i (causal in the packed order, which is the
    original order). A query whose own slot is padding also sees itself, so that no row is empty (an empty
    row would give NaN that then leaks through the values). For sdpa, None is returned when every key is
    valid and sdpa's own causal rule is exact (q == 1 or q == K). Eager takes an additive float mask.
    """
    batch, num_keys = key_valid.shape
    if implementation == "sdpa" and all_valid and (num_queries == 1 or num_queries == num_keys):
        return None
    device = key_valid.device
    query_at = torch.arange(num_queries, device=device) + (num_keys - num_queries)  # [q] key index of each query
    key_at = torch.arange(num_keys, device=device)
    causal = key_at.unsqueeze(0) <= query_at.unsqueeze(1)  # [q, K]
    itself = key_at.unsqueeze(0) == query_at.unsqueeze(1)  # [q, K]
    allowed = (causal.unsqueeze(0) & key_valid.unsqueeze(1)) | itself.unsqueeze(0)  # [B, q, K]
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        blocked = torch.finfo(dtype).min
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked)
    return allowed
