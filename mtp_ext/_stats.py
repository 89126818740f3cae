"""Confidence intervals of shares measured over groups of correlated positions (the positions of
one sequence share its text, so they are not independent draws)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_share_interval"]

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
    hits, positions = np.asarray(hits, dtype=float), np.asarray(positions, dtype=float)
    if hits.shape != positions.shape or hits.ndim != 1 or hits.size == 0:
        raise ValueError("hits and positions must be 1-D, of one non-zero length")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if hits.size == 1:
        share = float(hits[0] / positions[0])
        return share, share
    rows = np.random.default_rng(seed).integers(0, hits.size, size=(resamples, hits.size))
    shares = hits[rows].sum(1) / positions[rows].sum(1)
    tail = (1 - level) / 2
    low, high = np.quantile(shares, [tail, 1 - tail])
    return float(low), float(high)
