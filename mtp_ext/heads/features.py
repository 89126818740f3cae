"""The states a frozen backbone gives the heads, computed once and kept on disk, so that heads
train for epochs at the cost of the heads alone (the backbone's pass costs as much again).

A cache holds, for W training windows of T tokens, the S states per position that heads read
(`MTPHeadsModel.states_for_heads`: the last layer's output before the final norm, and with WHS
the embeddings and every layer: S = L + 1) as one memory-mapped array [W, S, T, H] of bfloat16
(or float32), with the windows' token ids beside it. It is filled a batch of windows at a time
and records how many windows are done after each, so a run cut short goes on where it stopped;
memory stays one batch of states whatever W is. A cache of every layer also serves heads that
read the last one only.

    directory/features.json   the model's fingerprint, shapes, dtype and windows done
    directory/tokens.npy      [W, T] int64
    directory/states.bin      [W, S, T, H] raw bfloat16 (as int16) or float32
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mtp_ext._io import UserError, atomic_write, atomic_write_text, read_json, required_keys
from mtp_ext.models.introspection import check_fingerprint, model_fingerprint

__all__ = ["DTYPES", "FeatureCache", "cache_features"]

META_FILE = "features.json"
TOKENS_FILE = "tokens.npy"
STATES_FILE = "states.bin"
META_KEYS = ("model", "windows", "seq_len", "states", "hidden_size", "dtype", "done")
# On disk bfloat16 is stored as the int16 with the same bits: numpy has no bfloat16.
DTYPES = {"bfloat16": (torch.bfloat16, np.int16, torch.int16), "float32": (torch.float32, np.float32, torch.float32)}
REMEDY = "delete the directory to build it again, or use another"


@dataclass
class FeatureCache:
    """An open cache (see the module docstring).

    Attributes:
        directory: where it lives.
        tokens: [W, T] int64, the windows.
        states: the memory-mapped [W, S, T, H] array (its raw dtype).
        dtype: the states' torch dtype.
        done: windows whose states are written (all W once complete).
    """

    directory: Path
    tokens: Tensor
    states: np.memmap
    dtype: torch.dtype
    done: int

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_states(self) -> int:
        """S, the states kept per position."""
        return self.states.shape[1]

    @property
    def complete(self) -> bool:
        """Whether every window's states are written."""
        return self.done == len(self)

    def read(self, rows: Sequence[int], num_states: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The states and tokens of some windows.

        Args:
            rows: window indices, each < `done`.
            num_states: S' <= S: the last S' states (1: the last layer only; S: all).
            dtype: of the states returned.

        Returns:
            (states [S', B, T, H] of `dtype`, token ids [B, T] int64), B = len(rows).
        """
        if num_states > self.num_states:
            raise UserError(f"the feature cache {self.directory} keeps {self.num_states} state(s) per position, "
                            f"these heads read {num_states}: build it with the heads that read most (--whs)")
        rows = list(rows)
        if rows and max(rows) >= self.done:
            raise ValueError(f"the feature cache {self.directory} holds {self.done} of {len(self)} windows")
        raw = np.ascontiguousarray(self.states[rows, self.num_states - num_states:])
        states = torch.from_numpy(raw).view(DTYPES[self._dtype_name][0]).to(dtype)
        return states.transpose(0, 1), self.tokens[rows]

    @property
    def _dtype_name(self) -> str:
        return next(name for name, (torch_dtype, _, _) in DTYPES.items() if torch_dtype == self.dtype)


@torch.no_grad()
def cache_features(model, windows: Sequence[Sequence[int]], directory: str | Path, dtype: str = "bfloat16",
                   batch_size: int = 4, progress: bool = True) -> FeatureCache:
    """The cache of `model`'s states over `windows` in `directory`: built, completed if an
    earlier run stopped part-way, or opened as it is.

    Args:
        model: MTPHeadsModel with a frozen backbone; the cache keeps the states it reads
            (num_read_states), or opens an existing cache that keeps at least as many.
        windows: W token id lists of one length T.
        directory: the cache directory (created if need be).
        dtype: "bfloat16" (half the disk) or "float32" (exactly the backbone's float32 states).
        batch_size: windows per backbone pass.
        progress: show a progress bar.

    Returns:
        The complete FeatureCache.
    """
    if not model.freeze_backbone:
        raise ValueError("cached features need a frozen backbone (joint training changes them every step)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokens = torch.tensor([list(window) for window in windows], dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError("cache_features needs at least one window, all of one length")
    directory = Path(directory)
    cache = _open(directory, model) if (directory / META_FILE).is_file() else _create(directory, model, tokens, dtype)
    if cache.tokens.shape != tokens.shape or not torch.equal(cache.tokens, tokens):
        raise UserError(f"the feature cache {directory} holds other windows (another --data, --seq-len or "
                        f"--train-windows); {REMEDY}")
    if cache.num_states < model.num_read_states:
        raise UserError(f"the feature cache {directory} keeps {cache.num_states} state(s) per position, these heads "
                        f"read {model.num_read_states}; {REMEDY}")
    device = model.unembed_weight.device
    with tqdm(total=len(cache), initial=cache.done, desc="cache features", unit="window",
              disable=not progress or cache.complete) as bar:
        while not cache.complete:
            rows = slice(cache.done, min(cache.done + batch_size, len(cache)))
            outputs = model.backbone.base_model(input_ids=cache.tokens[rows].to(device), output_hidden_states=True)
            states = model.states_for_heads(outputs.hidden_states, all_layers=cache.num_states > 1)
            _, numpy_dtype, raw_dtype = DTYPES[cache._dtype_name]
            raw = states.transpose(0, 1).to(cache.dtype).contiguous().view(raw_dtype).cpu().numpy()
            cache.states[rows] = raw.astype(numpy_dtype, copy=False)
            cache.states.flush()
            cache.done = rows.stop
            _write_meta(directory, model, cache)  # after the flush: `done` never counts unwritten states
            bar.update(rows.stop - rows.start)
    return cache


def _create(directory: Path, model, tokens: Tensor, dtype: str) -> FeatureCache:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / TOKENS_FILE, lambda path: _save_array(path, tokens.numpy()))
    shape = (tokens.shape[0], model.num_read_states, tokens.shape[1], model.unembed_weight.shape[1])
    states = np.memmap(directory / STATES_FILE, dtype=DTYPES[dtype][1], mode="w+", shape=shape)
    cache = FeatureCache(directory, tokens, states, DTYPES[dtype][0], 0)
    _write_meta(directory, model, cache)
    return cache


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file, not a name: np.save would add ".npy" to the temporary name
        np.save(file, array)


def _write_meta(directory: Path, model, cache: FeatureCache) -> None:
    windows, states, seq_len, hidden_size = cache.states.shape
    meta = {"model": model_fingerprint(model.backbone), "windows": windows, "seq_len": seq_len, "states": states,
            "hidden_size": hidden_size, "dtype": cache._dtype_name, "done": cache.done}
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))


def _open(directory: Path, model) -> FeatureCache:
    meta = read_json(directory / META_FILE, "the feature cache's description", REMEDY)
    required_keys(meta, META_KEYS, directory / META_FILE, "the feature cache's description")
    check_fingerprint(meta["model"], model.backbone, "feature cache")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{directory / META_FILE}: unknown dtype {meta['dtype']!r}; {REMEDY}")
    shape = (meta["windows"], meta["states"], meta["seq_len"], meta["hidden_size"])
    numpy_dtype = DTYPES[meta["dtype"]][1]
    size = (directory / STATES_FILE).stat().st_size if (directory / STATES_FILE).is_file() else -1
    if size != int(np.prod(shape)) * np.dtype(numpy_dtype).itemsize:  # mapping it would grow it silently
        raise UserError(f"the feature cache {directory} is damaged ({STATES_FILE} is missing or of another size); "
                        f"{REMEDY}")
    try:
        tokens = torch.from_numpy(np.load(directory / TOKENS_FILE)).long()
        states = np.memmap(directory / STATES_FILE, dtype=numpy_dtype, mode="r+", shape=shape)
    except (OSError, ValueError) as error:  # missing, truncated or of another size
        raise UserError(f"the feature cache {directory} is damaged ({error}); {REMEDY}") from error
    if tuple(tokens.shape) != shape[::2] or not 0 <= meta["done"] <= meta["windows"]:
        raise UserError(f"the feature cache {directory} does not match its description; {REMEDY}")
    return FeatureCache(directory, tokens, states, DTYPES[meta["dtype"]][0], int(meta["done"]))
