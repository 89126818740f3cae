"""Drop-in logits processors for Hugging Face generation."""
from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from mtp_ext.ops import top_p_mask


class TopPLogitsWarper(LogitsProcessor):
    """Hugging Face's TopPLogitsWarper without the vocabulary sort.

    `model.generate(..., do_sample=True, logits_processor=LogitsProcessorList([
    TopPLogitsWarper(0.9)]))` keeps the same tokens as the built-in warper (see `top_p_mask`).
    """

    def __init__(self, top_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep}")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return top_p_mask(scores, self.top_p, self.min_tokens_to_keep, self.filter_value)
