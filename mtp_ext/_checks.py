"""The argument checks every layer shares: one message for one mistake, wherever it is made."""
from __future__ import annotations

import math
from typing import Iterable

__all__ = ["check_top_p", "check_positive_int", "check_positive_ints", "check_temperature"]


def check_top_p(top_p: float, name: str = "top_p") -> float:
    """`top_p` as a float, after checking that it lies in (0, 1] (NaN does not).

    Args:
        top_p: the nucleus' share of the probability mass.
        name: what the message calls it.

    Returns:
        float(top_p).
    """
    value = _as_float(top_p, name)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {top_p}")
    return value


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """`temperature` as a float, after checking that it is finite and > 0."""
    value = _as_float(temperature, name)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """`value` as an int, after checking that it is an integer >= 1 (bools are not).

    Args:
        value: an int, or a float or tensor holding a whole number.
        name: what the message calls it.

    Returns:
        int(value).
    """
    if isinstance(value, bool) or not _is_whole(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_positive_ints(values: Iterable[int], name: str) -> tuple[int, ...]:
    """A non-empty sequence of integers >= 1, as a tuple of ints."""
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}") from None
    if not items or any(isinstance(item, bool) or not _is_whole(item) or item < 1 for item in items):
        raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    return tuple(int(item) for item in items)


def _is_whole(value) -> bool:
    try:
        return int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _as_float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
