"""Hugging Face ``transformers`` integration (optional extra ``hf``).

``import tensorattn.hf`` registers three attention implementations, each under one name with both
``transformers.AttentionInterface`` (the attention function) and
``transformers.masking_utils.AttentionMaskInterface`` (the mask function):

- ``"tensorattn"``: ``backend="auto"`` (poly where certified and cheaper, else exact);
- ``"tensorattn_exact"``: the exact backend;
- ``"tensorattn_poly"``: the polynomial backend (raises ``BoundError`` past the threshold).

The mask function matters: transformers builds no mask at all for an implementation that has no
mask function registered, and the logits would silently ignore padding. Ours describes the
standard causal and bidirectional masks (with padding) as ``causal=True`` plus a key padding mask,
which every backend serves; any other pattern (sliding windows, packed sequences, custom mask
functions) is passed on as a dense mask and runs on the exact backend.

Then ``model.set_attn_implementation("tensorattn_exact")``, or
``from_pretrained(..., attn_implementation="tensorattn")``, works for the models written on the
attention interface (the Llama family and most recent decoders). Grouped-query attention, the
model's ``scaling`` and transformers' output layout are handled here. ``record()`` collects the
``AttentionInfo`` of every call (backend, degree, certified error bound per layer).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterator

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tensorattn.hf needs Hugging Face transformers (with AttentionInterface and AttentionMaskInterface, "
        "transformers >= 5.0); install the extra: pip install 'tensorattn[hf]'"
    ) from exc

from .api import attention
from .errors import InputError

#: attention implementation name -> tensorattn backend
IMPLEMENTATIONS = {"tensorattn": "auto", "tensorattn_exact": "exact", "tensorattn_poly": "poly"}

#: sdpa_mask's parameters: transformers 5.0 takes the query positions (cache_position), later
#: versions the query length and offset
_SDPA_MASK_PARAMETERS = frozenset(inspect.signature(sdpa_mask).parameters)
#: the attribute of a mask tensor that carries its causal + key-padding description
_DESCRIPTION = "_tensorattn_mask"
_records: list | None = None


def build_mask(batch_size: int, q_length: int | None = None, kv_length: int = 0, q_offset: int = 0,
               kv_offset: int = 0, mask_function: Callable = causal_mask_function,
               attention_mask: torch.Tensor | None = None, local_size: int | None = None,
               allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
               device: torch.device | str = "cpu", cache_position: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor | None:
    """The mask of one forward pass, with transformers' mask-interface signature.

    Returns None for the plain causal (query and key positions aligned) or bidirectional pattern
    without padding; the attention function then reads ``is_causal`` from the module. Otherwise
    the dense boolean ``(batch, 1, q, kv)`` mask of ``sdpa_mask`` (True = attend), which any code
    may read; for the plain patterns with padding it also carries a description (causal, query
    offset, padded keys) that the attention function runs as ``causal=True`` plus a key padding
    mask, so the n x m mask is never read per tile and poly serves it."""
    if cache_position is not None:  # older transformers give the query positions instead
        q_length, q_offset, device = cache_position.shape[0], int(cache_position[0]), cache_position.device
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    keep = None if padding is None else padding[:, kv_offset: kv_offset + kv_length].to(torch.bool)
    plain = local_size is None and mask_function in (causal_mask_function, bidirectional_mask_function)
    causal = mask_function is causal_mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    unpadded = keep is None or bool(keep.all())
    if plain and unpadded and (not causal or (q_length == kv_length and q_offset == kv_offset)):
        return None
    if "cache_position" in _SDPA_MASK_PARAMETERS:
        queries = {"cache_position": torch.arange(q_offset, q_offset + q_length, device=device)}
    else:
        queries = {"q_length": q_length, "q_offset": q_offset, "device": device}
    dense = sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
                      allow_is_bidirectional_skip=False, use_vmap=use_vmap, **queries)
    if plain and q_offset >= kv_offset:
        padded = None if unpadded else ~keep
        setattr(dense, _DESCRIPTION, (causal, q_offset - kv_offset, padded))
    return dense


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, S, d) -> (B, H_kv * groups, S, d): each k/v head serves ``groups`` query heads."""
    if groups == 1:
        return x
    B, H, S, d = x.shape
    return x[:, :, None].expand(B, H, groups, S, d).reshape(B, H * groups, S, d)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, *, backend: str = "auto", **kwargs: Any
                      ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, L, d), key and value (B, H_kv, S, d)
    with H a multiple of H_kv; returns ((B, L, H, d_v), None)."""
    if dropout:
        raise InputError(
            f"attention dropout {dropout} (the model is in training mode with attention_dropout > 0): tensorattn "
            "never forms the attention weights that dropout would drop. Fix: set config.attention_dropout = 0.0"
        )
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise InputError(f"{name} is not supported by the tensorattn attention implementations; use 'sdpa' "
                             "or 'eager' for this model")
    if kwargs.get("output_attentions"):
        warnings.warn("tensorattn attention implementations return no attention weights (output_attentions)",
                      stacklevel=2)
    H, Hkv = query.shape[1], key.shape[1]
    if H % Hkv:
        raise InputError(f"query has {H} heads but key has {Hkv}; grouped-query attention needs a multiple")
    key, value = _repeat_heads(key, H // Hkv), _repeat_heads(value, H // Hkv)
    L, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    options: dict[str, Any] = {}
    description = getattr(attention_mask, _DESCRIPTION, None) if attention_mask is not None else None
    if attention_mask is None:
        causal = bool(causal) and L > 1  # one query (decoding) sees every cached key
        options["q_offset"] = 0 if causal else None
    elif description is not None and tuple(attention_mask.shape[-2:]) == (L, S):
        causal, offset, padded = description
        options["q_offset"] = offset if causal else None
        if padded is not None:
            options["key_padding_mask"] = padded[:, None, :]  # (B, 1, S): shared by the heads
    else:  # any other mask: transformers' convention is True (or 0.0) = attend
        causal = False
        options["attn_mask"] = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask
    recording = _records is not None
    res = attention(query, key, value, backend=backend, scale=scaling, causal=causal, return_info=recording,
                    **options)
    out = res[0] if recording else res
    if recording:
        _records.append((getattr(module, "layer_idx", None), res[1]))
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def record() -> Iterator[list]:
    """Collect ``(layer_idx, AttentionInfo)`` for every attention call in the block.

    >>> import tensorattn.hf  # doctest: +SKIP
    >>> with tensorattn.hf.record() as calls:  # doctest: +SKIP
    ...     model(input_ids)
    >>> max(info.error_bound for _, info in calls)  # doctest: +SKIP
    """
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


def _bind(backend: str) -> Callable:
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, backend=backend, **kwargs)

    forward.__name__ = f"tensorattn_{backend}_attention_forward"
    forward.__doc__ = f"``attention_forward`` with backend={backend!r}."
    return forward


def register() -> None:
    """Register every name of ``IMPLEMENTATIONS`` with both interfaces (done on import)."""
    for name, backend in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _bind(backend))
        AttentionMaskInterface.register(name, build_mask)


register()

__all__ = ["IMPLEMENTATIONS", "attention_forward", "build_mask", "record", "register"]
