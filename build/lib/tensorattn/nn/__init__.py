"""torch.nn modules: ``TensorAttention`` (functional wrapper) and ``MultiheadTensorAttention``, and
``convert`` (replace a model's ``torch.nn.MultiheadAttention`` layers)."""

from .convert import ConversionReport, LayerReport, convert
from .modules import MultiheadTensorAttention, TensorAttention

__all__ = ["ConversionReport", "LayerReport", "MultiheadTensorAttention", "TensorAttention", "convert"]
