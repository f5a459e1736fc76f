"""Error types. Every message names the operand, the offending values, the limit and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class TensorAttnError(ValueError):
    """Base class of every error raised by tensorattn for bad specs, inputs or bounds."""


class SpecError(TensorAttnError):
    """A spec (einsum strings, name or options) is malformed or unknown."""


class InputError(TensorAttnError):
    """An input array, option value or backend name is invalid for the chosen spec."""


class BoundError(TensorAttnError):
    """The polynomial method cannot certify the requested accuracy for these inputs."""


def valid_names(name: object, valid: Iterable[str]) -> str:
    """'did you mean ...' (close matches by ``difflib``) followed by every valid name, for an
    'unknown name' message."""
    names = sorted(valid)
    close = difflib.get_close_matches(name, names, n=3) if isinstance(name, str) else []
    listing = ", ".join(repr(v) for v in names)
    if close:
        quoted = [repr(c) for c in close]
        guess = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        return f"{listing} (did you mean {guess}?)"
    return listing
