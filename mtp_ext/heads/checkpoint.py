"""Checkpoints of heads (MTP heads, token heads), written and read one way: a JSON config that
names the backbone (its fingerprint) and safetensors files, each replaced atomically; every
damaged or missing file is a UserError that names it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from torch import Tensor, nn

from mtp_ext._io import MissingFileError, atomic_write, atomic_write_text, read_json, required_keys, unreadable
from mtp_ext.models.introspection import check_fingerprint

__all__ = ["DAMAGED", "check_checkpoint_dir", "read_config", "read_safetensors", "write_config", "write_module", "write_tensors"]

# The remedy every message about a damaged checkpoint file gives.
DAMAGED = "the checkpoint is damaged: train it again (or delete it)"

Loaded = TypeVar("Loaded")


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Tensors as one safetensors file, replaced atomically.

    Args:
        path: the file.
        tensors: name -> tensor (detached and made contiguous for writing).
    """
    from safetensors.torch import save_file

    contiguous = {name: value.detach().contiguous() for name, value in tensors.items()}
    atomic_write(path, lambda temporary: save_file(contiguous, temporary))


def write_module(path: Path, module: nn.Module) -> None:
    """A module's weights as one safetensors file, replaced atomically (tied weights once).

    Args:
        path: the file.
        module: the module whose state is written.
    """
    from safetensors.torch import save_model

    atomic_write(path, lambda temporary: save_model(module, temporary))


def write_config(path: Path, config: dict) -> None:
    """A checkpoint's JSON config, replaced atomically (written last: it marks a whole checkpoint).

    Args:
        path: the file.
        config: JSON-ready values.
    """
    atomic_write_text(path, json.dumps(config, indent=2))


def check_checkpoint_dir(directory: Path, config_file: str, what: str, label: str) -> None:
    """Raises a MissingFileError unless `directory` holds the config of a checkpoint: cheap, so
    callers check before loading any model.

    Args:
        directory: the checkpoint directory.
        config_file: the config's file name in it.
        what: what the checkpoint is, for the message.
        label: how the user gave the directory, e.g. "--heads-dir".
    """
    if not directory.is_dir():
        raise MissingFileError(f"{label} {directory} holds no {what}: no such directory")
    if not (directory / config_file).is_file():
        raise MissingFileError(f"{label} {directory} holds no {what}: {config_file} is missing")


def read_config(path: Path, kind: str, keys: tuple[str, ...], backbone: nn.Module) -> dict:
    """The config of a checkpoint, after checking it holds `keys` and a "model" fingerprint
    that matches `backbone` (a UserError naming the file otherwise).

    Args:
        path: the config file.
        kind: what the checkpoint is, for messages, e.g. "MTP heads checkpoint".
        keys: the entries it must hold besides "model".
        backbone: the model the checkpoint is put on.

    Returns:
        The config.
    """
    if not path.is_file():
        raise MissingFileError(f"{path.parent} holds no {kind} ({path.name} is missing)")
    config = required_keys(read_json(path, f"the {kind} config", DAMAGED), keys + ("model",), path,
                           f"the {kind} config", DAMAGED)
    check_fingerprint(config["model"], backbone, kind)
    return config


def read_safetensors(path: Path, what: str, read: Callable[[str], Loaded]) -> Loaded:
    """`read(str(path))` for a safetensors file of a checkpoint; a UserError naming the file when
    it is missing, truncated or not safetensors.

    Args:
        path: the file.
        what: what it holds, for the message.
        read: the loader, given the path as a string.

    Returns:
        What `read` returns.
    """
    from safetensors import SafetensorError

    if not path.is_file():
        raise MissingFileError(f"{what} {path} is missing: the checkpoint is incomplete; train it again")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError, EOFError) as error:
        raise unreadable(path, what, error, DAMAGED) from error
