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

DAMAGED = "the checkpoint is damaged: train it again (or delete it)"

Loaded = TypeVar("Loaded")


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Tensors as one safetensors file, replaced atomically."""
    from safetensors.torch import save_file

    contiguous = {name: value.detach().contiguous() for name, value in tensors.items()}
    atomic_write(path, lambda temporary: save_file(contiguous, temporary))


def write_module(path: Path, module: nn.Module) -> None:
    """A module's weights as one safetensors file, replaced atomically (tied weights once)."""
    from safetensors.torch import save_model

    atomic_write(path, lambda temporary: save_model(module, temporary))


def write_config(path: Path, config: dict) -> None:
    """A checkpoint's JSON config, replaced atomically (written last: it marks a whole checkpoint)."""
    atomic_write_text(path, json.dumps(config, indent=2))


def check_checkpoint_dir(directory: Path, config_file: str, what: str, label: str) -> None:
    """A MissingFileError unless `directory` (given as `label`, e.g. "--heads-dir") holds the
    config of a checkpoint, a `what`: cheap, so callers check before loading any model."""
    if not directory.is_dir():
        raise MissingFileError(f"{label} {directory} holds no {what}: no such directory")
    if not (directory / config_file).is_file():
        raise MissingFileError(f"{label} {directory} holds no {what}: {config_file} is missing")


def read_config(path: Path, kind: str, keys: tuple[str, ...], backbone: nn.Module) -> dict:
    """The config of a checkpoint (a `kind`, e.g. "MTP heads checkpoint") at `path`, after
    checking it holds `keys` and a "model" fingerprint that matches `backbone`."""
    if not path.is_file():
        raise MissingFileError(f"{path.parent} holds no {kind} ({path.name} is missing)")
    config = required_keys(read_json(path, f"the {kind} config", DAMAGED), keys + ("model",), path,
                           f"the {kind} config", DAMAGED)
    check_fingerprint(config["model"], backbone, kind)
    return config


def read_safetensors(path: Path, what: str, read: Callable[[str], Loaded]) -> Loaded:
    """`read(str(path))` for a safetensors file of a checkpoint; a UserError naming the file when
    it is missing, truncated or not safetensors."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise MissingFileError(f"{what} {path} is missing: the checkpoint is incomplete; train it again")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError, EOFError) as error:
        raise unreadable(path, what, error, DAMAGED) from error
