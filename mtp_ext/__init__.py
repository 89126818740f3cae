"""mtp_ext: multi-token prediction for language models trained for next-token prediction.

The kernels are registered as torch.ops.mtp_ext.*; the functions below are typed wrappers.

    ops, reference           the kernels' Python face; their plain-PyTorch truth
    tree                     draft forests, packed for one pass over a KV cache
    models, data             offline models and text; what mtp_ext needs from a HF model
    marginal, evaluate, analysis    the paper, part 1: marginalisation, Figs. 1-4
    heads                    the paper, part 2: MTP heads; the token head
    speculative              beyond the paper: lossless speculative decoding and its drafters
    integrations             Hugging Face (logits warper)
    cli                      the `mtp-ext` command, one module per subcommand
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
from mtp_ext.integrations.hf import TopPLogitsWarper  # noqa: E402
from mtp_ext.marginal import MarginalMTP  # noqa: E402
from mtp_ext.evaluate import evaluate_mtp  # noqa: E402
from mtp_ext.heads import MTPHeadsModel, TokenHead, load_heads  # noqa: E402
from mtp_ext.speculative import (  # noqa: E402
    Drafter,
    HeadsDrafter,
    MarginalDrafter,
    TokenHeadDrafter,
    TreeShape,
    register_drafter,
    speculative_generate,
)

__all__ = [
    "Drafter",
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
    "TreeShape",
    "UnembedTopk",
    "build_info",
    "load_heads",
    "marginal_accumulate",
    "multihead_cross_entropy",
    "multihead_unembed_topk",
    "register_drafter",
    "small_batch_linear",
    "top_p_candidates",
    "speculative_generate",
    "top_p_mask",
    "tree_pack",
    "tree_pack_teacher",
]
