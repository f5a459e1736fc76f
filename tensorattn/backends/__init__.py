"""Backends: how attention runs. Built-ins are registered explicitly here."""

from .base import BACKENDS, Backend, get_backend, register_backend
from .baselines import FavorBackend, SDPABackend, Taylor2Backend
from .exact import ExactBackend
from .poly import PolyBackend
from .relative_fft import relative_attention

register_backend(ExactBackend(), replace=True)
register_backend(PolyBackend(), replace=True).relative_impl = relative_attention  # spec 'relative' (DESIGN 5.4)
for _baseline in (SDPABackend(), FavorBackend(), Taylor2Backend()):
    register_backend(_baseline, replace=True)

__all__ = [
    "BACKENDS", "Backend", "ExactBackend", "FavorBackend", "PolyBackend", "SDPABackend", "Taylor2Backend",
    "get_backend", "register_backend",
]
