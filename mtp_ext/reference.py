"""Plain-PyTorch versions of every op: the ground truth for tests and the baseline for
benchmarks. Imports only torch.

They follow the kernels' definitions (README, "The ops") with a full sort of the vocabulary
and float64 cumulative sums; the kernels add up integer masses (2^-40 units of the top
token's probability), so the two agree except when a cumulative sum lies within about 1e-7
of top_p.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

# A token whose exp(s - max) is below 2^-41 rounds to zero integer mass in the kernels: it
# never enters a nucleus.
MIN_LIVE_RATIO = 2.0**-41


def _top_p_per_row(top_p: Union[float, Tensor], logits: Tensor) -> Tensor:
    if isinstance(top_p, Tensor):
        return top_p.to(torch.float64).expand(logits.shape[0])
    return torch.full((logits.shape[0],), float(top_p), dtype=torch.float64)


def nucleus_in_order(logits: Tensor, top_p: Union[float, Tensor], temperature: float = 1.0):
    """The sorted view of every row and its nucleus, before any cap.

    Returns (order [B, V] token ids by descending probability, ties by lower id;
    sorted_probs [B, V] float32; cum_before [B, V] float64, the live mass before each slot;
    target [B, 1] float64, top_p times the live mass; nucleus_size [B] int64).
    """
    scaled = logits.float() / temperature
    sorted_scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_scaled, dim=-1)
    live = torch.exp(sorted_scaled - sorted_scaled[:, :1]) >= MIN_LIVE_RATIO
    live_probs = sorted_probs.double() * live
    cum_before = live_probs.cumsum(dim=-1) - live_probs
    target = _top_p_per_row(top_p, logits).to(logits.device)[:, None] * live_probs.sum(-1, keepdim=True)
    in_nucleus = live & (cum_before < target)
    return order, sorted_probs, cum_before, target, in_nucleus.sum(dim=-1)


def top_p_candidates(
    logits: Tensor, top_p: Union[float, Tensor] = 0.99, max_candidates: int = 256, temperature: float = 1.0
):
    """Reference for mtp_ext.top_p_candidates: (ids, probs, counts, mass)."""
    order, sorted_probs, _, _, nucleus_size = nucleus_in_order(logits, top_p, temperature)
    batch, vocab = order.shape
    width = min(max_candidates, vocab)
    counts = nucleus_size.clamp(max=max_candidates)
    taken = torch.arange(width, device=logits.device)[None, :] < counts[:, None]
    ids = torch.full((batch, max_candidates), -1, dtype=torch.long, device=logits.device)
    probs = torch.zeros((batch, max_candidates), dtype=torch.float32, device=logits.device)
    ids[:, :width] = torch.where(taken, order[:, :width], -1)
    probs[:, :width] = torch.where(taken, sorted_probs[:, :width], 0.0)
    mass = probs.double().sum(dim=-1).float()
    return ids, probs, counts.to(torch.int32), mass


def top_p_mask(
    logits: Tensor, top_p: Union[float, Tensor], min_tokens_to_keep: int = 1, filter_value: float = -math.inf
) -> Tensor:
    """Reference for mtp_ext.top_p_mask."""
    order, _, _, _, nucleus_size = nucleus_in_order(logits, top_p)
    keep_count = nucleus_size.clamp(min=min_tokens_to_keep)
    keep_sorted = torch.arange(order.shape[1], device=logits.device)[None, :] < keep_count[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    whole_row = (_top_p_per_row(top_p, logits) >= 1.0).to(logits.device)[:, None]
    keep = torch.where(whole_row, logits != -math.inf, keep)
    return logits.masked_fill(~keep, filter_value)
