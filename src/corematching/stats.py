"""Uncertainty of measured accuracies: 95% intervals from the number of questions."""

from __future__ import annotations

import math
import statistics

Z95 = 1.959964  # two-sided 95% quantile of the normal distribution


def wilson_interval(correct: float, total: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an accuracy of `correct` right answers out of `total` (Wilson score interval)."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one answer, got {total}")
    if not 0 <= correct <= total:
        raise ValueError(f"right answers must lie between 0 and {total}, got {correct}")
    share = correct / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(first: list[bool], second: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): the accuracy of `first` minus that of `second`, answers to the same questions in the same
    order, with a 95% interval from the per-question differences (normal approximation)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired answers must be two lists of the same non-zero length, got {len(first)} and "
                         f"{len(second)}")
    differences = [int(a) - int(b) for a, b in zip(first, second)]
    mean = sum(differences) / len(differences)
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    half = z * spread / math.sqrt(len(differences))
    return mean, mean - half, mean + half
