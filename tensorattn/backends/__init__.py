"""Backends: how attention runs. Built-ins are registered explicitly here."""

from .base import BACKENDS, Backend, get_backend, register_backend
from .exact import ExactBackend
from .poly import PolyBackend
from .relative_fft import relative_attention

register_backend(ExactBackend(), replace=True)
register_backend(PolyBackend(), replace=True).relative_impl = relative_attention  # spec 'relative' (DESIGN 5.4)

__all__ = ["BACKENDS", "Backend", "ExactBackend", "PolyBackend", "get_backend", "register_backend"]
