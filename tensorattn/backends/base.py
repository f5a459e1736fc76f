"""Backend interface and registry. Every backend is written once and serves every spec it supports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputError, closest_names

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..inputs import Operands
    from ..plan import Plan


class Backend:
    """A way to compute attention. ``run`` receives the validated operands and the plan."""

    name = "base"
    #: True when the backend's result carries a certified error bound
    certified = False

    def check(self, ops: "Operands") -> None:
        """Raise InputError with a reason when this backend cannot serve ``ops.spec``."""

    def run(self, plan: "Plan", ops: "Operands") -> "torch.Tensor":  # pragma: no cover - abstract
        raise NotImplementedError


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    if backend.name == "auto":
        raise InputError("'auto' is reserved for automatic backend choice")
    if backend.name in BACKENDS and not replace:
        raise InputError(
            f"a backend named {backend.name!r} is already registered; choose another name or pass "
            "replace=True"
        )
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(
            f"unknown backend {name!r}; valid backends are {closest_names(name, ['auto', *BACKENDS])}"
        ) from None
