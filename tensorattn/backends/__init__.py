"""Backends: how attention runs. Built-ins are registered explicitly here."""

from .base import BACKENDS, Backend, get_backend, register_backend
from .exact import ExactBackend
from .poly import PolyBackend

register_backend(ExactBackend(), replace=True)
register_backend(PolyBackend(), replace=True)

__all__ = ["BACKENDS", "Backend", "ExactBackend", "PolyBackend", "get_backend", "register_backend"]
