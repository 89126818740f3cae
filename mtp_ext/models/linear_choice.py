"""Which of small_batch_linear and F.linear is faster for a linear layer's shape and row count,
measured on the machine it runs on.

small_batch_linear streams the weights for a handful of rows, which beats a GEMM library's
small-M path on some CPUs and loses to it on others (the project's machines change between AMD
and Intel, with and without AVX-512: bench/README.md, small_batch_linear). So the choice is not
a rule but a measurement: the first call of a shape at a row count (rounded up to a power of
two) times both on weights larger than the caches, as a model's pass reads them, and the
faster one serves every later call. Choices are kept per process and on disk
(`<MTP_EXT_CACHE or ~/.cache/mtp_ext>/linear_choices.json`, keyed by CPU, compiled library,
torch version and thread count), so a machine measures each shape once per build; a measurement whose repeats disagree (the
machine was busy) serves its process only and is taken again in the next.

MTP_EXT_LINEAR=kernel or =torch in the environment forces one side (tests, benchmarks).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtp_ext.ops import linear_over_rows

__all__ = ["ROW_BUCKETS", "chooser", "kernel_is_faster", "row_bucket"]

# Row counts at which a choice is measured; a call of r rows takes the smallest bucket >= r.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Weights swept per timing: more than a CPU's caches, as in a forward pass. At most this many
# copies of a small weight, where calls are bound by their fixed cost anyway.
_SWEEP_BYTES = 64 << 20
_MAX_COPIES = 256
_REPEATS = 5
# The kernel must win by this share to be chosen: a tie keeps torch's own path.
_MARGIN = 0.03
# Repeats whose slowest took more than this many times the fastest: a busy machine.
_STEADY_SPREAD = 1.5
_MODE_VARIABLE = "MTP_EXT_LINEAR"

_choices: dict[str, bool] = {}  # by _key: what the disk cache holds, and this process's
_decided: dict[tuple[int, int, int, int], bool] = {}  # (out, in, bucket, threads): the hot path's lookup
_loaded_from: Optional[Path] = None


def row_bucket(rows: int) -> int:
    """The row count at which a call of `rows` rows is decided: the power of two at or above it."""
    return min(1 << max(rows - 1, 0).bit_length(), ROW_BUCKETS[-1])


def kernel_is_faster(out_features: int, in_features: int, rows: int) -> bool:
    """Whether small_batch_linear beats F.linear for float32 weights [out_features, in_features]
    and `rows` input rows on this machine at torch's current thread count.

    Args:
        out_features: N of the weight [N, K].
        in_features: K.
        rows: input rows of the call.

    Returns:
        True where the kernel was measured faster (by more than the margin), also when
        MTP_EXT_LINEAR=kernel; False where F.linear was, or MTP_EXT_LINEAR=torch.
    """
    return chooser(out_features, in_features)(rows)


def _choice(out_features: int, in_features: int, bucket: int) -> bool:
    """The choice from the disk cache, or measured now."""
    key = _key(out_features, in_features, bucket)
    _load()
    choice = _choices.get(key)
    if choice is None:
        kernel, torch_seconds, steady = measure(out_features, in_features, bucket)
        choice = _choices[key] = choose(kernel, torch_seconds)
        if steady:
            _save(key)
    return choice


def chooser(out_features: int, in_features: int) -> Callable[[int], bool]:
    """kernel_is_faster for one weight shape, as a function of the row count, with the
    environment's override read once: what a model's linear layer asks on every call.

    Args:
        out_features: N of the weight [N, K].
        in_features: K.

    Returns:
        rows -> whether small_batch_linear is the faster at that many rows.
    """
    mode = os.environ.get(_MODE_VARIABLE, "auto")
    if mode != "auto":
        forced = mode == "kernel"
        return lambda rows: forced

    def kernel_faster(rows: int) -> bool:
        bucket = row_bucket(rows)
        decided = (out_features, in_features, bucket, torch.get_num_threads())
        choice = _decided.get(decided)
        if choice is None:
            choice = _decided[decided] = _choice(out_features, in_features, bucket)
        return choice

    return kernel_faster


def choose(kernel_seconds: float, torch_seconds: float) -> bool:
    """The kernel, if it took less than F.linear by more than the margin."""
    return kernel_seconds < torch_seconds * (1.0 - _MARGIN)


def measure(out_features: int, in_features: int, rows: int) -> tuple[float, float, bool]:
    """(small_batch_linear, F.linear) seconds for one sweep over weights [out_features,
    in_features] that do not fit in the caches, the best of a few repeats each, and whether the
    repeats agreed (False: the machine was busy, the choice is not worth keeping)."""
    copies = max(1, min(_MAX_COPIES, _SWEEP_BYTES // max(1, 4 * out_features * in_features)))
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn((copies, out_features, in_features), generator=generator)
    rows_input = torch.randn((rows, in_features), generator=generator)

    def kernel(weight: Tensor) -> Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            return linear_over_rows(rows_input, weight, None)

    with torch.no_grad():
        kernel_times = _sweeps(kernel, weights)
        torch_times = _sweeps(lambda weight: F.linear(rows_input, weight), weights)
    steady = all(max(times) <= _STEADY_SPREAD * min(times) for times in (kernel_times, torch_times))
    return min(kernel_times), min(torch_times), steady


def _sweeps(function: Callable[[Tensor], Tensor], weights: Tensor) -> list[float]:
    function(weights[0])  # first-call costs out of the timing
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        for weight in weights:
            function(weight)
        times.append(time.perf_counter() - start)
    return times


def _key(out_features: int, in_features: int, bucket: int) -> str:
    return (f"{_machine()}|build {_library_build()}|torch {torch.__version__}|threads {torch.get_num_threads()}|"
            f"{out_features}x{in_features}|rows {bucket}")


@functools.lru_cache(maxsize=1)
def _library_build() -> str:
    """A digest of the compiled library: a rebuilt kernel measures anew."""
    from mtp_ext import _C

    return hashlib.sha1(Path(_C.__file__).read_bytes()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    """The CPU model and the vector extensions the kernels use: another CPU measures anew."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    extensions = "+".join(sorted(flags & {"avx2", "fma", "avx512f", "avx512vl", "avx512dq"}))
    return f"{model} [{extensions}]"


def _cache_file() -> Path:
    from mtp_ext.data._common import cache_root

    return cache_root() / "linear_choices.json"


def _load() -> None:
    """The choices measured earlier on this machine, once per process (a damaged file is ignored:
    the choices are measured again)."""
    global _loaded_from
    path = _cache_file()
    if _loaded_from == path:
        return
    _loaded_from = path
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(saved, dict):
        _choices.update({key: value for key, value in saved.items() if isinstance(value, bool)})


def _save(key: str) -> None:
    """The choice of `key` added to the cache file, written atomically; a cache that cannot be
    written only costs a measurement in the next process."""
    from mtp_ext._io import atomic_write_text

    path = _cache_file()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    saved[key] = _choices[key]
    try:
        atomic_write_text(path, json.dumps(saved, indent=1, sort_keys=True))
    except OSError:
        pass
