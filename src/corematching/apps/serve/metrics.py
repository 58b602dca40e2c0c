"""The serving numbers: percentiles of latencies, and the scheduler's counters in the Prometheus text format."""

from __future__ import annotations

import math


def percentile(values: list[float], share: float) -> float:
    """Linear-interpolated percentile of values (share in [0, 1]); nan for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

def metrics_text(scheduler) -> str:
    """The scheduler's numbers in the Prometheus text format (version 0.0.4)."""
    values = scheduler.metrics() if hasattr(scheduler, "metrics") else {"unfinished_requests": scheduler.pending}
    lines = []
    for name, value in values.items():
        help_text, kind = METRICS.get(name, (name.replace("_", " "), "gauge"))
        metric = f"corematching_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {float(value):g}"]
    return "\n".join(lines) + "\n"


METRICS = {
    "queue_length": ("Requests waiting to join the decode batch.", "gauge"),
    "batch_size": ("Requests in the running decode batch.", "gauge"),
    "kv_bytes": ("Bytes of the running batch's KV cache (padding slots included).", "gauge"),
    "kv_reserved_bytes": ("KV bytes reserved by the running requests (kept tokens and max_tokens).", "gauge"),
    "sliced_weight_bytes": ("Bytes of sliced FFN weights held for core-neuron decoding.", "gauge"),
    "tokens_generated_total": ("Tokens generated since the server started.", "counter"),
    "requests_finished_total": ("Requests finished (answered, stopped or cancelled).", "counter"),
    "decode_steps_total": ("Decode steps run.", "counter"),
    "prefills_total": ("Prefill calls run (each for the requests that arrived together).", "counter"),
    "unfinished_requests": ("Requests accepted and not yet finished.", "gauge"),
    "tokens_per_second": ("Tokens generated per second over the recent decode steps.", "gauge"),
}
