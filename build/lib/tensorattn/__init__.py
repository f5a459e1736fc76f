"""tensorattn: generalized (higher-order) attention with exact and certified polynomial backends.

>>> import tensorattn as ta
>>> ta.list_specs()
['pairwise', 'relative', 'rope', 'strassen', 'tree', 'triple']

The subpackages ``ta.nn``, ``ta.distributed``, ``ta.backends`` and ``ta.bench`` load on first
use; planning (``ta.plan``) loads no backend code.
"""

import importlib

from .api import AttentionInfo, attend, attention, attention_weights, check_bounds, grad_bound_for
from .errors import BoundError, InputError, SpecError, TensorAttnError
from .planning import BoundWarning, Plan, make_plan, plan, plan_for, threshold
from .registry import Backend, Refusal, get_backend, register_backend, registered
from .request import Problem, Request
from .spec import Spec, get_spec, list_specs, register_builtins, register_spec, unregister_spec

register_builtins()

__version__ = "0.1.0"

_LAZY_MODULES = ("backends", "bench", "distributed", "nn", "testing")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "BACKENDS":
        return registered()
    raise AttributeError(f"module 'tensorattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AttentionInfo",
    "BACKENDS",
    "Backend",
    "BoundError",
    "BoundWarning",
    "InputError",
    "Plan",
    "Problem",
    "Refusal",
    "Request",
    "Spec",
    "SpecError",
    "TensorAttnError",
    "attend",
    "attention",
    "attention_weights",
    "backends",
    "check_bounds",
    "distributed",
    "get_backend",
    "get_spec",
    "grad_bound_for",
    "list_specs",
    "make_plan",
    "nn",
    "plan",
    "plan_for",
    "register_backend",
    "register_spec",
    "threshold",
    "unregister_spec",
]
