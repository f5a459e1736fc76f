"""tensorattn: generalized (higher-order) attention with exact and certified polynomial backends.

>>> import tensorattn as ta
>>> ta.list_specs()
['pairwise', 'relative', 'rope', 'triple']
"""

from . import (
    backends,  # registers the built-in backends
    distributed,  # ta.distributed.attention: sequence parallel on torch.distributed
    nn,  # ta.nn.TensorAttention, ta.nn.MultiheadTensorAttention
)
from .api import AttentionInfo, attention, check_bounds, grad_bound_for
from .errors import BoundError, InputError, SpecError, TensorAttnError
from .planning import BoundWarning, Plan, make_plan, plan, plan_for, threshold
from .registry import BACKENDS, Backend, Refusal, get_backend, register_backend
from .request import Problem, Request
from .spec import Spec, get_spec, list_specs, register_builtins, register_spec, unregister_spec

register_builtins()

__version__ = "0.1.0"

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
    "attention",
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
