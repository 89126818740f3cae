"""Lossless self-speculative decoding (beyond the paper): a drafter proposes a tree of
continuations, one packed pass verifies it, and the model's own choices are kept.

    protocol.py   what a drafter is (Drafter, with a complete example), the types it speaks
    drafters.py   the drafters (marginal, MTP heads, token head, lookup in the context) and the
                  registry of names
    decoder.py    the engine: speculative_generate, SpeculativeDecoder, the walk
"""
from mtp_ext.speculative.decoder import GenerationStats, SpeculativeDecoder, SpeculativeOutput, speculative_generate
from mtp_ext.speculative.drafters import (
    HeadsDrafter,
    LookupDrafter,
    LookupFirstDrafter,
    MarginalDrafter,
    TokenHeadDrafter,
    check_drafter,
    default_drafter_name,
    drafter_help,
    prepared_token_head_dir,
    register_drafter,
    registered_drafters,
    resolve_drafter,
)
from mtp_ext.speculative.protocol import (
    Chooser,
    Drafter,
    ModelLogits,
    NodeState,
    TokenRule,
    TreeShape,
    VerifiedPass,
)

__all__ = [
    "Chooser",
    "Drafter",
    "GenerationStats",
    "HeadsDrafter",
    "LookupDrafter",
    "LookupFirstDrafter",
    "MarginalDrafter",
    "ModelLogits",
    "NodeState",
    "SpeculativeDecoder",
    "SpeculativeOutput",
    "TokenHeadDrafter",
    "TokenRule",
    "TreeShape",
    "VerifiedPass",
    "check_drafter",
    "default_drafter_name",
    "drafter_help",
    "prepared_token_head_dir",
    "register_drafter",
    "registered_drafters",
    "resolve_drafter",
    "speculative_generate",
]
