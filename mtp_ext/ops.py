"""Typed wrappers over torch.ops.mtp_ext.* and their fake (meta) kernels.

The fake kernels give output shapes without running anything, so the ops trace under
torch.compile(fullgraph=True); every output has a fixed size for the same reason.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
from torch import Tensor

TopP = Union[float, Tensor]


class TopPCandidates(NamedTuple):
    """The nucleus of each row as a padded candidate set (see `top_p_candidates`)."""

    ids: Tensor  # [B, C] int64, -1 in unused slots
    probs: Tensor  # [B, C] float32, 0 in unused slots
    counts: Tensor  # [B] int32, filled slots
    mass: Tensor  # [B] float32, probability held by the filled slots


def _top_p_per_row(top_p: TopP, logits: Tensor) -> Tensor:
    """top_p as the float32 [B] tensor the ops take. Scalars are checked here, without reading
    any device memory; tensors are checked by the op."""
    if isinstance(top_p, Tensor):
        # Checked here too: a meta tensor would send the call to the fake kernel.
        if top_p.device != logits.device:
            raise ValueError(f"top_p is on {top_p.device} but logits are on {logits.device}")
        if top_p.dim() == 0:
            top_p = top_p.expand(logits.shape[0])
        return top_p.to(torch.float32)
    top_p = float(top_p)
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    return torch.full((logits.shape[0],), top_p, dtype=torch.float32, device=logits.device)


def top_p_candidates(
    logits: Tensor,
    top_p: TopP = 0.99,
    max_candidates: int = 256,
    temperature: float = 1.0,
) -> TopPCandidates:
    """The top-p nucleus of every row of `logits` [B, V] (float32, bfloat16 or float16).

    Probabilities are softmax(logits / temperature) in float32. The nucleus of a row is the
    shortest run of tokens, in order of descending probability (ties: lower id first), whose
    probability reaches `top_p` (a float, or a float tensor [B]; values in (0, 1]). Tokens more
    than 29 nats below the row's top logit (probability < 2.5e-13 of the top token's) carry no
    mass and never enter a nucleus.

    Returns `TopPCandidates(ids, probs, counts, mass)`: the first `counts[b] = min(nucleus size,
    max_candidates)` slots of `ids[b]` / `probs[b]` hold the nucleus in that order, the rest
    hold -1 / 0; `mass[b]` is the probability of the returned tokens.

    No sort of the vocabulary: a radix select finds the threshold and only the selected tokens
    are sorted. Deterministic, and the same result on CPU and CUDA.
    """
    if isinstance(max_candidates, bool) or int(max_candidates) != max_candidates or max_candidates < 1:
        raise ValueError(f"max_candidates must be an integer >= 1, got {max_candidates}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    _check_logits_rank(logits)
    ids, probs, counts, mass = torch.ops.mtp_ext.top_p_candidates(
        logits, _top_p_per_row(top_p, logits), int(max_candidates), temperature
    )
    return TopPCandidates(ids, probs, counts, mass)


def top_p_mask(
    logits: Tensor,
    top_p: TopP,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
) -> Tensor:
    """`logits` [B, V] with every token outside the nucleus set to `filter_value`.

    Keeps the tokens Hugging Face's TopPLogitsWarper keeps: the nucleus of `top_p_candidates`
    (at temperature 1), grown to the `min_tokens_to_keep` most probable tokens. At top_p = 1
    only tokens of logit -inf are filtered (Hugging Face also filters finite logits whose fp32
    probability underflows to 0, more than about 100 nats below the top one).
    Returns a new tensor of the same dtype.
    """
    if isinstance(min_tokens_to_keep, bool) or int(min_tokens_to_keep) != min_tokens_to_keep or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep}")
    _check_logits_rank(logits)
    return torch.ops.mtp_ext.top_p_mask(
        logits, _top_p_per_row(top_p, logits), int(min_tokens_to_keep), float(filter_value)
    )


def _check_logits_rank(logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")


@torch.library.register_fake("mtp_ext::top_p_candidates")
def _top_p_candidates_fake(logits, top_p, max_candidates, temperature):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [batch, vocab]")
    batch = logits.shape[0]
    return (
        logits.new_empty((batch, max_candidates), dtype=torch.long),
        logits.new_empty((batch, max_candidates), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.int32),
        logits.new_empty((batch,), dtype=torch.float32),
    )


@torch.library.register_fake("mtp_ext::top_p_mask")
def _top_p_mask_fake(logits, top_p, min_tokens_to_keep, filter_value):
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D [batch, vocab]")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)
