"""torch.nn modules: ``TensorAttention`` (functional wrapper) and ``MultiheadTensorAttention``."""

from .modules import MultiheadTensorAttention, TensorAttention

__all__ = ["MultiheadTensorAttention", "TensorAttention"]
