"""Confidence intervals of shares measured over groups of correlated positions (the positions of
one sequence share its text, so they are not independent draws)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_difference_interval", "bootstrap_share_interval"]

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_share_interval(hits: Sequence[float], positions: Sequence[float], level: float = 0.95,
                             resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of sum(hits) / sum(positions), resampling the groups
    (sequences) with replacement.

    Args:
        hits: per group, the positions that count (e.g. top-5 hits).
        positions: per group, the positions scored (> 0 in all).
        level: the interval's coverage, in (0, 1).
        resamples: bootstrap resamples.
        seed: of the resampling, so that a result can be reproduced.

    Returns:
        (low, high); (share, share) for a single group, whose spread cannot be told.
    """
    hits, positions = _groups(hits, positions)
    return _percentile_interval(lambda rows: hits[rows].sum(-1) / positions[rows].sum(-1), hits.size, level,
                                resamples, seed)


def bootstrap_difference_interval(hits_a: Sequence[float], positions_a: Sequence[float], hits_b: Sequence[float],
                                  positions_b: Sequence[float], level: float = 0.95,
                                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The paired percentile bootstrap interval of share A - share B, each share sum(hits) /
    sum(positions) over the same groups: each resample draws one set of groups for both, so
    that what the groups share (their text) cancels out of the difference.

    Args:
        hits_a, positions_a: per group, A's counting and scored positions (> 0 in all).
        hits_b, positions_b: the same for B, over the same groups in the same order.
        level, resamples, seed: as in bootstrap_share_interval.

    Returns:
        (low, high); (difference, difference) for a single group.
    """
    hits_a, positions_a = _groups(hits_a, positions_a)
    hits_b, positions_b = _groups(hits_b, positions_b)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"A and B must cover the same groups, got {hits_a.size} and {hits_b.size}")
    return _percentile_interval(lambda rows: hits_a[rows].sum(-1) / positions_a[rows].sum(-1)
                                - hits_b[rows].sum(-1) / positions_b[rows].sum(-1), hits_a.size, level, resamples, seed)


def _groups(hits: Sequence[float], positions: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    hits, positions = np.asarray(hits, dtype=float), np.asarray(positions, dtype=float)
    if hits.shape != positions.shape or hits.ndim != 1 or hits.size == 0:
        raise ValueError("hits and positions must be 1-D, of one non-zero length")
    return hits, positions


def _percentile_interval(statistic, groups: int, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile interval of statistic(rows) (rows: indices of groups, the last axis one
    resample) over bootstrap resamples; the statistic itself where one group leaves no spread."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if groups == 1:
        value = float(statistic(np.zeros(1, dtype=int)))
        return value, value
    values = statistic(np.random.default_rng(seed).integers(0, groups, size=(resamples, groups)))
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)
