"""Checks for scalar arguments, shared by every frontend: each raises an InputError that names the
argument, the value given and what is allowed. Python and numpy scalars are accepted alike; a bool
is never a number, and a string is never a bool."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np

from .errors import InputError, valid_names


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite real number in the given range, returned as a Python float."""
    ok = is_number(value) and math.isfinite(float(value))
    if ok:
        x = float(value)
        if low is not None and (x < low or (low_open and x == low)):
            ok = False
        if high is not None and (x > high or (high_open and x == high)):
            ok = False
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
        kind = " (a bool is not a number)" if isinstance(value, (bool, np.bool_)) else ""
        raise InputError(f"{name}={_show(value)} must be a finite number{where}{kind}" + (f"; {hint}" if hint else ""))
    return float(value)


def check_int(name: str, value: Any, *, low: int | None = None, hint: str = "") -> int:
    """An integer >= ``low``, returned as a Python int."""
    if not is_int(value) or (low is not None and int(value) < low):
        bound = "" if low is None else f" >= {low}"
        kind = " (a bool is not a number)" if isinstance(value, (bool, np.bool_)) else ""
        if isinstance(value, float) and value.is_integer():
            kind = f" (got a float; pass {int(value)})"
        raise InputError(f"{name}={_show(value)} must be an int{bound}{kind}" + (f"; {hint}" if hint else ""))
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """True or False (numpy bools too); strings and numbers are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}={_show(value)} must be True or False (got {type(value).__name__})")
    return bool(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name}={_show(value)} is not one of {valid_names(value, choices)}")
    return value
