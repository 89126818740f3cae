"""mtp_ext: multi-token prediction for language models trained for next-token prediction.

The kernels are registered as torch.ops.mtp_ext.*; the functions below are typed wrappers.
"""
from mtp_ext._library import build_info, load_compiled_library

_C = load_compiled_library()

from mtp_ext.ops import TopPCandidates, top_p_candidates, top_p_mask  # noqa: E402
from mtp_ext.sampling import TopPLogitsWarper  # noqa: E402

__all__ = [
    "TopPCandidates",
    "TopPLogitsWarper",
    "build_info",
    "top_p_candidates",
    "top_p_mask",
]
