"""What mtp_ext reads off a Hugging Face model's structure, for every supported architecture:
its final norm, its decoder layers, and the fingerprint that ties a checkpoint to it."""
from __future__ import annotations

from torch import nn

from mtp_ext._io import UserError

__all__ = ["check_fingerprint", "decoder_layers", "final_norm", "model_fingerprint"]

FINGERPRINT_KEYS = ("model_type", "hidden_size", "vocab_size", "num_layers")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm every architecture applies before the unembedding.

    Args:
        model: a Hugging Face causal LM.

    Returns:
        Its base model's final norm module (a ValueError when there is none).
    """
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"cannot find the final norm of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a model (or of its base model), in order.

    Args:
        model: a Hugging Face causal LM.

    Returns:
        The ModuleList of its base model's layers (a ValueError when there is none).
    """
    base = model.base_model
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return getattr(base, name)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies the model a checkpoint belongs to: architecture, sizes and name.

    Args:
        model: a Hugging Face causal LM.

    Returns:
        {"model_type", "hidden_size", "vocab_size", "num_layers", "name"}: the name is None
        where the model has none.
    """
    config = model.config
    name = getattr(config, "mtp_ext_model_name", None) or getattr(config, "_name_or_path", "") or None
    return {
        "model_type": config.model_type,
        "hidden_size": int(model.get_output_embeddings().weight.shape[1]),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "num_layers": int(config.num_hidden_layers),
        "name": name,
    }


def check_fingerprint(saved: dict, model: nn.Module, kind: str) -> None:
    """Raises a UserError when a checkpoint is put on another model than its own.

    The name counts only when both are known (a copy of a model in another directory is the
    same model).

    Args:
        saved: the checkpoint's model_fingerprint.
        model: the model it is put on.
        kind: what the checkpoint is, for the message, e.g. "MTP heads checkpoint".
    """
    if not isinstance(saved, dict):
        raise UserError(f"the {kind}'s \"model\" entry is not a JSON object but {saved!r}: it is damaged; "
                        "train it again")
    current = model_fingerprint(model)
    differences = [f"{key} {saved.get(key)!r} (checkpoint) vs {current[key]!r} (model)"
                   for key in FINGERPRINT_KEYS if saved.get(key) != current[key]]
    if saved.get("name") and current["name"] and saved["name"] != current["name"] and not differences:
        differences.append(f"name {saved['name']!r} (checkpoint) vs {current['name']!r} (model)")
    if differences:
        raise UserError(f"the {kind} belongs to another model: " + "; ".join(differences))
