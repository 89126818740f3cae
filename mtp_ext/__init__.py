"""mtp_ext: multi-token prediction for language models trained for next-token prediction.

The kernels are registered as torch.ops.mtp_ext.*; the functions below are typed wrappers.
"""
from mtp_ext._library import build_info, load_compiled_library

_C = load_compiled_library()

from mtp_ext.ops import (  # noqa: E402
    TopPCandidates,
    TreePack,
    UnembedTopk,
    marginal_accumulate,
    multihead_cross_entropy,
    multihead_unembed_topk,
    small_batch_linear,
    top_p_candidates,
    top_p_mask,
    tree_pack,
    tree_pack_teacher,
)
from mtp_ext.sampling import TopPLogitsWarper  # noqa: E402
from mtp_ext.marginal import MarginalMTP  # noqa: E402
from mtp_ext.evaluate import evaluate_mtp  # noqa: E402
from mtp_ext.heads import MTPHeadsModel, load_heads  # noqa: E402
from mtp_ext.speculative import HeadsDrafter, MarginalDrafter, TokenHeadDrafter, speculative_generate  # noqa: E402
from mtp_ext.token_head import TokenHead  # noqa: E402

__all__ = [
    "HeadsDrafter",
    "MTPHeadsModel",
    "MarginalDrafter",
    "MarginalMTP",
    "evaluate_mtp",
    "TokenHead",
    "TokenHeadDrafter",
    "TopPCandidates",
    "TopPLogitsWarper",
    "TreePack",
    "UnembedTopk",
    "build_info",
    "load_heads",
    "marginal_accumulate",
    "multihead_cross_entropy",
    "multihead_unembed_topk",
    "small_batch_linear",
    "top_p_candidates",
    "speculative_generate",
    "top_p_mask",
    "tree_pack",
    "tree_pack_teacher",
]
