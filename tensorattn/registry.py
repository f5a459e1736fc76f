"""The backend interface and its registry.

The planner chooses among registered backends by asking each one whether it ``serves`` a spec and
problem; it never imports an implementation. Backends (``tensorattn.backends``) subclass
``Backend`` and are registered explicitly by that package, which the registry imports the first
time it is read (``registered()``): planning alone loads no backend code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError, valid_names

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .inputs import Operands
    from .planning import Plan
    from .request import Problem
    from .spec import Spec

#: the backend name that lets the planner choose
AUTO = "auto"


@dataclass(frozen=True)
class Refusal:
    """A backend's answer when it cannot serve a problem: falsy, and says why."""

    reason: str

    def __bool__(self) -> bool:
        return False


class Backend:
    """A way to compute attention.

    ``serves(spec, problem)`` returns True, or a ``Refusal`` whose ``reason`` says why not;
    ``problem`` is None when only the spec is known (an nn module checks at construction).
    ``run(plan, ops)`` computes the result for validated operands under the plan's decisions.
    """

    name = "base"
    #: True when the backend's result carries a certified error bound
    certified = False
    #: True when ``run`` applies ``ops.key_bias`` / ``ops.attn_mask``; a backend that leaves it
    #: False is never given a masked problem (``serving``), so it cannot ignore a mask silently
    applies_masks = False
    #: True when every matrix product of the backward runs in the dtypes the plan chose whatever the
    #: autocast state (the backward is the backend's own autograd.Functions, each under
    #: ``inputs.full_precision_backward``); otherwise the frontend reroutes the backward of the
    #: recorded graph through ``api.planned_backward``, which turns autocast off for it
    precise_backward = False

    def serves(self, spec: "Spec", problem: "Problem | None") -> "bool | Refusal":
        return True

    def run(self, plan: "Plan", ops: "Operands") -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


BACKENDS: dict[str, Backend] = {}
_BUILTINS = "tensorattn.backends"
_builtins_loaded = False


def registered() -> dict[str, Backend]:
    """The live registry, with the built-in backends registered (imported on first use)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(_BUILTINS)
    return BACKENDS


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Register ``backend`` under ``backend.name``; a duplicate name is refused unless ``replace``."""
    if not isinstance(backend, Backend):
        raise InputError(f"register_backend expects a ta.Backend instance, got {type(backend).__name__}")
    if backend.name == AUTO:
        raise InputError(f"the backend name {AUTO!r} is reserved for automatic backend choice; choose another")
    registry = BACKENDS if backend.__module__.startswith(_BUILTINS) else registered()
    if backend.name in registry and not replace:
        raise InputError(
            f"a backend named {backend.name!r} is already registered; choose another name or pass replace=True"
        )
    registry[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; an unknown name lists the valid ones."""
    registry = registered()
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown backend {name!r}; valid backends are {valid_names(name, [AUTO, *registry])}"
        ) from None


def serving(impl: Backend, spec: "Spec", problem: "Problem | None") -> "bool | Refusal":
    """``impl.serves(spec, problem)``, refusing masked problems for backends that do not apply masks."""
    if problem is not None and (problem.key_mask or problem.attn_mask) and not impl.applies_masks:
        return Refusal(f"backend {impl.name!r} does not apply key padding or attention masks")
    return impl.serves(spec, problem)


def backends_serving(spec: "Spec", problem: "Problem", registry: dict[str, Backend] | None = None) -> list[str]:
    """Names of the registered backends that serve ``spec`` on ``problem`` (for error messages)."""
    registry = registered() if registry is None else registry
    return [name for name, impl in registry.items() if serving(impl, spec, problem)]
