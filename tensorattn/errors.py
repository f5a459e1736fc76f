"""Error types. Every message names the operand, the offending values, the limit and the fix."""

from __future__ import annotations


class TensorAttnError(ValueError):
    """Base class of every error raised by tensorattn for bad specs, inputs or bounds."""


class SpecError(TensorAttnError):
    """A spec (einsum strings, name or options) is malformed or unknown."""


class InputError(TensorAttnError):
    """An input array, option value or backend name is invalid for the chosen spec."""


class BoundError(TensorAttnError):
    """The polynomial method cannot certify the requested accuracy for these inputs."""


def closest_names(name: str, valid) -> str:
    """Format the list of valid names for an 'unknown name' message."""
    return ", ".join(repr(v) for v in sorted(valid))
