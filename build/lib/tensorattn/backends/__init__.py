"""Backends: how attention runs. Each one is written once, serves every spec it says it serves
(``Backend.serves``) and runs a Plan. Built-ins are registered explicitly here."""

from ..registry import BACKENDS, Backend, Refusal, get_backend, register_backend
from .baselines import FavorBackend, SDPABackend, Taylor2Backend
from .exact import ExactBackend
from .poly import PolyBackend

for _backend in (ExactBackend(), PolyBackend(), SDPABackend(), FavorBackend(), Taylor2Backend()):
    register_backend(_backend, replace=True)

__all__ = [
    "BACKENDS", "Backend", "ExactBackend", "FavorBackend", "PolyBackend", "Refusal", "SDPABackend",
    "Taylor2Backend", "get_backend", "register_backend",
]
