"""Spec layer: what a mechanism is."""

from .builtins import BUILTIN_SPECS, register_builtins
from .parser import ScoreEinsum, ValueEinsum, parse_score, parse_value
from .registry import get_spec, list_specs, register_spec, unregister_spec
from .spec import Spec

__all__ = [
    "BUILTIN_SPECS",
    "ScoreEinsum",
    "Spec",
    "ValueEinsum",
    "get_spec",
    "list_specs",
    "parse_score",
    "parse_value",
    "register_builtins",
    "register_spec",
    "unregister_spec",
]
