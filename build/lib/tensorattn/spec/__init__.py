"""Spec layer: what a mechanism is."""

from .builtins import BUILTIN_SPECS, register_builtins
from .parser import ScoreEinsum, ValueEinsum, parse_score, parse_term, parse_value
from .polynomial import SlotLayout, Structure, Term, parse_polynomial
from .registry import get_spec, list_specs, register_spec, unregister_spec
from .spec import Spec

__all__ = [
    "BUILTIN_SPECS",
    "ScoreEinsum",
    "SlotLayout",
    "Spec",
    "Structure",
    "Term",
    "ValueEinsum",
    "get_spec",
    "list_specs",
    "parse_polynomial",
    "parse_score",
    "parse_term",
    "parse_value",
    "register_builtins",
    "register_spec",
    "unregister_spec",
]
