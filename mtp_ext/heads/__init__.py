"""The paper, part 2, and a drafting head beyond it.

    model.py        MTPHeadsModel: N heads on a backbone (frozen, weighted hidden states, joint)
    token_head.py   TokenHead: a drafting head that also reads the next token; its training
    training.py     training MTP heads (resumable, exact), held-out scoring
    checkpoint.py   how every head checkpoint is written and read
"""
from mtp_ext.heads.model import HEAD_TYPES, MTPHeadsModel, check_finite_lse, load_heads
from mtp_ext.heads.token_head import TokenHead, TokenHeadSettings, evaluate_token_head, train_token_head
from mtp_ext.heads.training import TrainingSettings, evaluate_heads, split_documents, train_heads

__all__ = [
    "HEAD_TYPES",
    "MTPHeadsModel",
    "TokenHead",
    "TokenHeadSettings",
    "TrainingSettings",
    "check_finite_lse",
    "evaluate_heads",
    "evaluate_token_head",
    "load_heads",
    "split_documents",
    "train_heads",
    "train_token_head",
]
