"""Drop-in logits processors for Hugging Face generation."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LogitsProcessor
from transformers import TopPLogitsWarper as HFTopPLogitsWarper

from mtp_ext._checks import check_positive_int, check_top_p
from mtp_ext.ops import top_p_candidates, top_p_mask

# Unit roundoff of float32: Hugging Face's softmax runs in float32 (also for bf16/fp16 scores),
# and so does torch.cumsum's accumulator for bf16/fp16.
_U32 = 2.0**-24
OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["TopPLogitsWarper", "hf_top_p_keep"]


class TopPLogitsWarper(LogitsProcessor):
    """Hugging Face's TopPLogitsWarper without the vocabulary sort.

    `model.generate(..., do_sample=True, logits_processor=LogitsProcessorList([
    TopPLogitsWarper(0.9)]))` keeps the same tokens as the built-in warper (see `top_p_mask`)
    except where the two rules deliberately differ (README, "Differences from peers").

    Args:
        top_p: the nucleus probability, in (0, 1].
        filter_value: the value given to every token outside the nucleus.
        min_tokens_to_keep: the nucleus is grown to at least this many tokens (>= 1).
        match_hf: False: the project's rule, `top_p_mask` (probabilities in float32, exact
            cumulative sums, ties at the boundary go to the lower id). True: exactly the tokens
            `transformers.TopPLogitsWarper` keeps, rounding and tie order included: its softmax
            in the scores' dtype, its float cumulative sum from the bottom compared with
            `1 - top_p`, and among tied logits split by the boundary the ones its
            `torch.sort(stable=False)` puts last. Rows whose result follows from the ops alone
            (no tie group split by the boundary, rounding bounds that decide every token near
            it) take a sort-free path; the others run through transformers' own warper, which
            sorts the row.
    """

    def __init__(self, top_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1,
                 match_hf: bool = False):
        self.top_p = check_top_p(top_p)
        self.filter_value = filter_value
        self.min_tokens_to_keep = check_positive_int(min_tokens_to_keep, "min_tokens_to_keep")
        self.match_hf = bool(match_hf)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Filters one generation step's scores.

        Args:
            input_ids: [B, T] int64, the sequences so far (unused, as in Hugging Face's warper).
            scores: [B, V] logits, float32, bfloat16 or float16 (any floating dtype with
                match_hf=True).

        Returns:
            [B, V]: `scores` with every token outside the nucleus set to `filter_value`, a new
            tensor of the scores' dtype.
        """
        if not self.match_hf:
            return top_p_mask(scores, self.top_p, self.min_tokens_to_keep, self.filter_value)
        keep, decided = hf_top_p_keep(scores, self.top_p, self.min_tokens_to_keep)
        out = scores.masked_fill(~keep, self.filter_value)
        if not decided.all():
            hf_warper = HFTopPLogitsWarper(self.top_p, self.filter_value, self.min_tokens_to_keep)
            out[~decided] = hf_warper(input_ids, scores[~decided])
        return out


def hf_top_p_keep(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> tuple[Tensor, Tensor]:
    """The tokens `transformers.TopPLogitsWarper(top_p, min_tokens_to_keep=...)` keeps, without a sort.

    Args:
        scores: [B, V] logits, any floating dtype.
        top_p: the nucleus probability, in (0, 1].
        min_tokens_to_keep: as in Hugging Face's warper.

    Returns:
        (keep [B, V] bool: in every decided row exactly Hugging Face's kept set, all False
        elsewhere; decided [B] bool). Undecided rows need Hugging Face's sort: a tie group
        split by the boundary, a decision within rounding of its threshold, a boundary beyond
        the tokens the ops select, or a row the ops reject (NaN, +inf, all -inf, a dtype other
        than float32/bf16/fp16).
    """
    batch, vocab = scores.shape
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    decided = torch.zeros(batch, dtype=torch.bool, device=scores.device)
    if scores.dtype not in OP_DTYPES or batch == 0:
        return keep, decided
    rows = ((torch.isfinite(scores) | (scores == -math.inf)).all(dim=1)
            & torch.isfinite(scores).any(dim=1)).nonzero().flatten()
    if rows.numel() == 0:
        return keep, decided
    row_scores = scores[rows]
    lo, hi = _hf_probability_bounds(row_scores)
    if top_p >= 1.0:
        row_keep, row_decided = _keep_at_top_p_one(lo, hi, min_tokens_to_keep)
    else:
        row_keep, row_decided = _keep_below_top_p_one(row_scores, lo, hi, top_p, min_tokens_to_keep)
    keep[rows] = row_keep & row_decided[:, None]
    decided[rows] = row_decided
    return keep, decided


def _hf_probability_bounds(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds (lo, hi), float64 [B, V], on the probability Hugging Face gives each token: the
    softmax, in the scores' dtype, of the row sorted ascending. torch's softmax adds the
    exponentials up in float32 in that sorted order, which only a sort reproduces bit for bit, so
    each value is bounded by the rounding that sum can carry, then rounded to the dtype."""
    logits = scores.float()
    exps = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    total = exps.double().sum(dim=1, keepdim=True)
    probs = exps.double() / total
    # The sum runs in (at least) 8 interleaved lanes: each addition is off by at most U32 of its
    # lane's partial sum, the lanes are combined at the end, and each exponential may differ by
    # a few ulp from ours; then the reciprocal and the product round once each.
    delta = _U32 * (_ascending_lane_partial_sums(exps.double(), lanes=8) / total + 24)
    lo = (probs * (1 - delta)).clamp(min=0).to(scores.dtype).double()
    hi = (probs * (1 + delta)).to(scores.dtype).double()
    # A float32 exponential may flush results below the normal range to zero.
    lo = torch.where(exps < 2.0**-126, 0.0, lo)
    return lo, hi


def _ascending_lane_partial_sums(exps: Tensor, lanes: int) -> Tensor:
    """An upper bound [B, 1] on the sum of all partial sums when a row of e >= 0 is added up in
    ascending order in `lanes` interleaved accumulators: each e_i is followed in its lane by at
    most #{j : e_j >= e_i} / lanes + 1 additions, counted per binade of e."""
    binade = (1 - torch.frexp(exps).exponent).clamp(0, 1100).long()  # e <= 1: larger e, smaller index
    counts = torch.zeros((exps.shape[0], 1101), dtype=torch.float64, device=exps.device)
    counts.scatter_add_(1, binade, torch.ones_like(exps))
    at_or_above = counts.cumsum(dim=1).gather(1, binade)
    return (exps * (at_or_above / lanes + 1)).sum(dim=1, keepdim=True)


def _cumsum_error(dtype: torch.dtype, vocab: int) -> float:
    """Relative error bound of torch.cumsum over a row of `dtype` probabilities in ascending order
    (sequential; accumulated in float64 for float32, in float32 for bfloat16 and float16)."""
    if dtype == torch.float32:
        return vocab * 2.0**-53
    # Each of the first 2^15 bf16 terms (2^12 fp16 ones: 11 significant bits) is at least 2^-15
    # of the partial sum before it, so adding it is exact but when the sum enters a new binade
    # (at most 130 times); later additions are off by up to U32 of the sum.
    exact_terms = 2**15 if dtype == torch.bfloat16 else 2**12
    return _U32 * (130 + max(0, vocab - exact_terms))


def _keep_at_top_p_one(lo: Tensor, hi: Tensor, min_tokens_to_keep: int) -> tuple[Tensor, Tensor]:
    """At top_p = 1 Hugging Face removes the tokens whose cumulative probability is 0, that is the
    tokens whose own probability underflows to 0 in the scores' dtype."""
    surely_kept, maybe_kept = lo > 0, hi > 0
    decided = (surely_kept == maybe_kept).all(dim=1)
    # Growing the set to min_tokens_to_keep would pick among zero-probability tokens in the
    # sort's order.
    decided &= surely_kept.sum(dim=1) >= min(min_tokens_to_keep, lo.shape[1])
    return surely_kept, decided


def _keep_below_top_p_one(scores: Tensor, lo: Tensor, hi: Tensor, top_p: float,
                          min_tokens_to_keep: int) -> tuple[Tensor, Tensor]:
    """Hugging Face keeps a token when the float cumulative probability of it and every token
    below it, rounded to the dtype, exceeds 1 - top_p, and then at least min_tokens_to_keep
    tokens. That cumulative sum falls down the descending order, so the kept tokens are the
    first K of it; the ops give that order for the tokens near the top."""
    batch, vocab = scores.shape
    ids, count = _top_tokens(scores, top_p, min_tokens_to_keep)
    width = ids.shape[1]
    valid = torch.arange(width, device=scores.device)[None, :] < count[:, None]
    safe_ids = ids.clamp(min=0)
    # Bounds on the cumulative probability of each position and every token below it.
    error = _cumsum_error(scores.dtype, vocab)
    lo_at, hi_at = lo.gather(1, safe_ids) * valid, hi.gather(1, safe_ids) * valid
    below_lo = lo.sum(dim=1, keepdim=True) - (lo_at.cumsum(dim=1) - lo_at)
    below_hi = hi.sum(dim=1, keepdim=True) - (hi_at.cumsum(dim=1) - hi_at)
    below_lo = below_lo * (1 - error) - 2.0**-45  # float64 cancellation in the differences
    below_hi = below_hi * (1 + error) + 2.0**-45
    threshold = 1 - top_p  # compared as Hugging Face does: a Python float against the dtype
    surely_kept = ~(below_lo.to(scores.dtype) <= threshold) & valid
    maybe_kept = ~(below_hi.to(scores.dtype) <= threshold) & valid
    nucleus = surely_kept.sum(dim=1)
    decided = nucleus == maybe_kept.sum(dim=1)
    # The first removed position must be among the selected tokens (or every token is kept).
    decided &= (nucleus < count) | (count == vocab)
    kept = nucleus.clamp(min=min_tokens_to_keep, max=vocab)
    decided &= kept <= count
    # Which members of a tie group split by the boundary Hugging Face keeps depends on its sort.
    last = ids.gather(1, (kept - 1).clamp(0, width - 1)[:, None]).clamp(min=0)
    tied_or_above = (scores >= scores.gather(1, last)).sum(dim=1)
    decided &= tied_or_above == kept
    in_prefix = torch.arange(width, device=scores.device)[None, :] < kept[:, None]
    # Unused slots write True to the top token, which every row keeps: no slot may clear another.
    keep = torch.zeros((batch, vocab), dtype=torch.bool, device=scores.device)
    keep.scatter_(1, torch.where(valid, ids, ids[:, :1]), in_prefix | ~valid)
    return keep, decided


def _top_tokens(scores: Tensor, top_p: float, min_tokens_to_keep: int) -> tuple[Tensor, Tensor]:
    """(ids [B, C], counts [B]): each row's C tokens of highest logit in descending order, from
    the ops; C is one more than the nucleus at a slightly larger top_p (which covers the
    rounding of Hugging Face's bf16/fp16 sums), and at least min_tokens_to_keep."""
    vocab = scores.shape[1]
    loose = min(1.0, top_p + (1.0 - top_p) / 32 + 1e-6)
    nucleus = (top_p_mask(scores, loose) != -math.inf).sum(dim=1)
    width = min(vocab, max(int(nucleus.max()) + 1, min_tokens_to_keep))
    candidates = top_p_candidates(scores, 1.0, width)
    return candidates.ids, candidates.counts.long()
