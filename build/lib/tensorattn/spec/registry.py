"""A plain registry of named specs: duplicates refused, unknown names list the valid ones."""

from __future__ import annotations

from ..errors import SpecError, valid_names
from .spec import Spec

_SPECS: dict[str, Spec] = {}


def register_spec(spec: Spec, *, replace: bool = False) -> Spec:
    """Register ``spec`` under ``spec.name``. A duplicate name is refused unless ``replace``."""
    if not isinstance(spec, Spec):
        raise SpecError(f"register_spec expects a ta.Spec, got {type(spec).__name__}")
    if spec.name in _SPECS and not replace:
        raise SpecError(
            f"a spec named {spec.name!r} is already registered ({_SPECS[spec.name]!r}); "
            "choose another name or pass replace=True"
        )
    _SPECS[spec.name] = spec
    return spec


def unregister_spec(name: str) -> Spec:
    """Remove and return a registered spec."""
    return _SPECS.pop(get_spec(name).name)


def get_spec(name: str | Spec) -> Spec:
    """Look a spec up by name (a Spec instance is returned as is)."""
    if isinstance(name, Spec):
        return name
    if not isinstance(name, str):
        raise SpecError(f"spec must be a name or a ta.Spec, got {type(name).__name__}")
    try:
        return _SPECS[name]
    except KeyError:
        raise SpecError(
            f"unknown spec {name!r}; registered specs are {valid_names(name, _SPECS)}. "
            "Register your own with ta.register_spec(ta.Spec(name, score_einsum))"
        ) from None


def list_specs() -> list[str]:
    """Names of all registered specs, sorted."""
    return sorted(_SPECS)


def _registry() -> dict[str, Spec]:
    """The live registry dict (tests snapshot and restore it)."""
    return _SPECS
