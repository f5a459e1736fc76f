"""tensorattn: generalized (higher-order) attention with exact and certified polynomial backends.

>>> import tensorattn as ta
>>> ta.list_specs()
['pairwise', 'relative', 'rope', 'triple']
"""

from . import (
    backends,  # registers built-in backends
    distributed,  # ta.distributed.attention: sequence parallel on torch.distributed
    nn,  # ta.nn.TensorAttention, ta.nn.MultiheadTensorAttention
)
from .api import AttentionInfo, BoundReport, attention, check_bounds, grad_error_bound
from .backends import BACKENDS, Backend, get_backend, register_backend
from .errors import BoundError, InputError, SpecError, TensorAttnError
from .plan import BoundWarning, Plan, plan, threshold
from .spec import Spec, get_spec, list_specs, register_builtins, register_spec, unregister_spec

register_builtins()

__version__ = "0.1.0"

__all__ = [
    "backends",
    "distributed",
    "nn",
    "AttentionInfo",
    "BACKENDS",
    "Backend",
    "BoundError",
    "BoundReport",
    "BoundWarning",
    "InputError",
    "Plan",
    "Spec",
    "SpecError",
    "TensorAttnError",
    "attention",
    "check_bounds",
    "distributed",
    "get_backend",
    "get_spec",
    "grad_error_bound",
    "list_specs",
    "nn",
    "plan",
    "register_backend",
    "register_spec",
    "threshold",
    "unregister_spec",
]
