"""torch.nn frontends: ``TensorAttention`` (functional wrapper) and ``MultiheadTensorAttention``.

Both validate their spec, backend and options in ``__init__`` (a bad argument fails at
construction, not at the first forward pass) and call ``ta.attention``; they never compute
attention themselves. Differences from ``torch.nn.MultiheadAttention`` are listed in docs/torch.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import positional
from ..api import AttentionInfo, attend
from ..checks import check_bool, check_int, check_number
from ..errors import InputError, SpecError
from ..registry import get_backend
from ..request import Request, with_call_signature
from ..spec import Spec, get_spec


def _resolve_spec(spec: str | Spec) -> Spec:
    if not isinstance(spec, (str, Spec)):
        raise SpecError(
            f"spec must be a registered name such as 'pairwise' or 'triple', or a ta.Spec; got "
            f"{spec!r} ({type(spec).__name__}). (torch.nn.MultiheadAttention's third positional "
            "argument is dropout; here it is the spec)"
        )
    return get_spec(spec)


def _spec_state(spec: Spec) -> tuple:
    # Spec keeps its options in a read-only mappingproxy, which does not pickle; store the fields
    return (spec.name, spec.score, spec.value, spec.positional, dict(spec.options), spec.description)


def _request_field(name: str) -> property:
    def get(self):
        return getattr(self.request, name)

    def set_(self, value):
        self.request = dataclasses.replace(self.request, **{name: value})

    return property(get, set_, doc=f"the ``{name}`` of this module's Request (settable)")


class _SpecModule(nn.Module):
    """Shared plumbing: the spec, the validated Request and spec options, picklable state."""

    spec: Spec
    request: Request

    def _setup(self, spec, options: dict[str, Any]) -> None:
        """Validate everything attention() would check that does not depend on the arrays."""
        self.spec = _resolve_spec(spec)
        self.request, resolved = Request.from_call(self.spec, **options)
        positional.check_options(self.spec.positional, resolved)
        if self.request.backend != "auto":
            serves = get_backend(self.request.backend).serves(self.spec, None)
            if not serves:
                raise InputError(
                    f"backend={self.request.backend!r} cannot serve spec {self.spec.name!r}: {serves.reason}. "
                    "Fix: backend='auto' or 'exact'"
                )
        #: the options given at construction (request knobs are in ``request``)
        self.spec_options = {key: resolved[key] for key in options if key in self.spec.options}

    # the call settings live in the request; setting one (e.g. ``module.backend = "exact"`` for
    # evaluation) builds a new, validated request
    backend = _request_field("backend")
    tol = _request_field("tol")
    causal = _request_field("causal")
    scale = _request_field("scale")
    on_unbounded = _request_field("on_unbounded")

    def _attend(self, q, k, v, causal: bool | None, return_info: bool, call_options: dict):
        request, options = self.request.with_causal(causal), self.spec_options
        if call_options:  # per-call request knobs or spec options override the module's
            request, options = Request.from_call(
                self.spec, **{f: getattr(request, f) for f in Request.names()}, **self.spec_options, **call_options
            )
        return _attend_eager(self.spec, q, k, v, request, options, return_info)

    def _spec_repr(self) -> str:
        name = self.spec.name if get_spec_or_none(self.spec.name) == self.spec else repr(self.spec)
        r = self.request
        changed = [f"{f}={getattr(r, f)!r}" for f in Request.names()
                   if f not in ("backend", "tol", "causal", "scale", "on_unbounded")
                   and getattr(r, f) != getattr(_DEFAULT_REQUEST, f)]
        extra = "".join(f", {x}" for x in changed) + "".join(f", {k}={v!r}" for k, v in self.spec_options.items())
        return (
            f"spec={name!r}, order={self.spec.order}, backend={r.backend!r}, tol={r.tol:g}, "
            f"causal={r.causal}, scale={r.scale!r}, on_unbounded={r.on_unbounded!r}{extra}"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["spec"] = _spec_state(self.spec)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["spec"] = Spec(*state["spec"])
        super().__setstate__(state)


_DEFAULT_REQUEST = Request()


@torch.compiler.disable
def _attend_eager(spec, q, k, v, request, spec_options, return_info):
    """attend() outside any torch.compile graph: the plan reads data (norms -> beta -> degree)
    and runs numpy, so tracing it would only add graph breaks; the projections around it compile."""
    return attend(spec, q, k, v, request, spec_options, return_info=return_info)


def get_spec_or_none(name: str) -> Spec | None:
    try:
        return get_spec(name)
    except SpecError:
        return None


class TensorAttention(_SpecModule):
    """``ta.attention`` as a module, with no parameters: the spec and options are fixed here.

    ``forward(q, k, v, *, causal=None, return_info=False, **spec_options)`` takes arrays laid out as
    in ``ta.attention`` (``(..., n, d)``; sequences of arrays for the keys and values of order > 2)
    and returns the output, or ``(output, info)`` with ``return_info=True``.

    >>> import torch, tensorattn as ta
    >>> attn = ta.nn.TensorAttention(spec="triple", backend="exact")
    >>> q = torch.randn(2, 16, 8)
    >>> attn(q, (q, q), (q, q)).shape
    torch.Size([2, 16, 8])
    """

    @with_call_signature()
    def __init__(self, spec: str | Spec = "pairwise", **options: Any) -> None:
        super().__init__()
        self._setup(spec, options)

    def forward(self, q, k, v, *, causal: bool | None = None, return_info: bool = False, **spec_options):
        return self._attend(q, k, v, causal, return_info, spec_options)

    def extra_repr(self) -> str:
        return self._spec_repr()


def _one_feature_per_slot(spec: Spec) -> None:
    """MultiheadTensorAttention projects each token to one head_dim vector per slot and combines
    values entrywise; refuse specs whose operands carry other shapes, with the alternative."""
    se, ve = spec.score_einsum, spec.value_einsum
    for op, feats in zip(se.operands, se.features):
        if len(feats) != 1:
            raise SpecError(
                f"MultiheadTensorAttention needs one feature index per score operand (each slot is "
                f"projected to a head_dim vector), but operand {op!r} of spec {spec.name!r} "
                f"({spec.score!r}) has {len(feats)}. Fix: use ta.nn.TensorAttention with your own "
                "projections for this spec"
            )
    letters = set(ve.value_letters) | {ve.out_letters}
    if any(len(x) != 1 for x in ve.value_letters) or len(ve.out_letters) != 1 or len(letters) != 1:
        raise SpecError(
            f"MultiheadTensorAttention needs a value einsum whose operands and output carry the same "
            f"single value index (like 'je,ke->ie'), but spec {spec.name!r} has {spec.value!r}. Fix: "
            "use ta.nn.TensorAttention with your own projections for this spec"
        )


class MultiheadTensorAttention(_SpecModule):
    """Multi-head generalized attention, a drop-in for ``torch.nn.MultiheadAttention``.

    Args:
        embed_dim: model width E (the query input size and the output size).
        num_heads: number of heads H; ``embed_dim`` must be divisible by it (head_dim = E / H).
        spec: a registered spec name or a ``ta.Spec`` whose score operands each have one feature
            index ("pairwise", "triple", "rope", "relative", order-k specs such as "id,jd,kd,ld->ijkl").
        bias: add biases to the input and output projections.
        batch_first: inputs and output are (batch, seq, feature) when True (the default here; torch's
            default is False), else (seq, batch, feature).
        kdim, vdim: sizes of the key / value inputs (default ``embed_dim``).
        dropout: must be 0.0. Attention-weight dropout needs the weight tensor, which is never built.
        **options: the settings of ``ta.Request`` (backend, tol, causal, scale, on_unbounded ...) and
            the spec options, as in ``ta.attention``.
        qk_norm: if a number rho, the projected query and every projected key are L2-normalized per
            head and multiplied by rho. Then beta <= scale * rho^order, so the polynomial backend's
            degree (and cost) stays fixed during training instead of growing with the weights.

    An order-k spec gets one key and one value projection per key slot (k - 1 of each); the slots'
    values are multiplied entrywise, as the spec's value einsum says.

    ``forward(query, key=None, value=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, average_attn_weights=True, is_causal=None, *, return_info=False,
    **spec_options)`` returns ``(output, None)``, or ``(output, info)`` with ``return_info=True``.

    >>> import torch, tensorattn as ta
    >>> mha = ta.nn.MultiheadTensorAttention(32, 4, spec="triple", backend="exact")
    >>> x = torch.randn(2, 10, 32)
    >>> out, _ = mha(x, x, x)
    >>> out.shape
    torch.Size([2, 10, 32])
    """

    @with_call_signature()
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        spec: str | Spec = "pairwise",
        *,
        bias: bool = True,
        batch_first: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        qk_norm: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim, low=1, hint="the model width")
        num_heads = check_int("num_heads", num_heads, low=1)
        kdim = None if kdim is None else check_int("kdim", kdim, low=1, hint="the key input size, or None")
        vdim = None if vdim is None else check_int("vdim", vdim, low=1, hint="the value input size, or None")
        bias, batch_first = check_bool("bias", bias), check_bool("batch_first", batch_first)
        dropout = check_number("dropout", dropout, low=0.0, high=1.0)
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise InputError(f"dtype={dtype!r} must be None or a torch float dtype (torch.float16, torch.bfloat16, "
                             "torch.float32, torch.float64): the parameters are trained")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise InputError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from None
        if embed_dim % num_heads:
            raise InputError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; each head gets "
                f"embed_dim // num_heads features. Fix: e.g. num_heads={math.gcd(embed_dim, num_heads)}"
            )
        if dropout != 0.0:
            raise InputError(
                f"dropout={dropout!r}: attention-weight dropout needs the attention weights, which "
                "tensorattn never materializes (n^k entries for order k). Fix: dropout=0.0 and apply "
                "nn.Dropout to the output instead"
            )
        if qk_norm is not None:
            qk_norm = check_number("qk_norm", qk_norm, low=0.0, low_open=True, hint="the query/key radius, or None")
        self._setup(spec, options)
        _one_feature_per_slot(self.spec)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.spec.positional == "rope" and self.head_dim % 2:
            raise InputError(
                f"spec 'rope' rotates pairs of coordinates, but head_dim = {embed_dim} // {num_heads} = "
                f"{self.head_dim} is odd. Fix: choose embed_dim / num_heads even"
            )
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.batch_first = batch_first
        self.qk_norm = None if qk_norm is None else float(qk_norm)
        self.dropout = 0.0
        slots = self.num_slots = self.spec.order - 1  # key (and value) slots; read in forward
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.ModuleList(nn.Linear(self.kdim, embed_dim, bias=bias, **factory) for _ in range(slots))
        self.v_proj = nn.ModuleList(nn.Linear(self.vdim, embed_dim, bias=bias, **factory) for _ in range(slots))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as torch.nn.MultiheadAttention: xavier-uniform input projections, zero biases
        for lin in [self.q_proj, *self.k_proj, *self.v_proj]:
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def _slots(self, x, name: str, default) -> list[torch.Tensor]:
        slots = self.num_slots
        if x is None:
            x = default
        if isinstance(x, (list, tuple)):
            if len(x) != slots:
                raise InputError(
                    f"{name} is a sequence of {len(x)} tensors but spec {self.spec.name!r} has {slots} "
                    f"key slot(s); pass one tensor (shared by every slot) or {slots}"
                )
            return list(x)
        return [x] * slots

    def _check_inputs(self, tensors: list[torch.Tensor], slots: int) -> None:
        """Feature sizes, dtype, device and lengths against the projections, as (batch, seq, features)."""
        weight = self.q_proj.weight
        names = ["query", *["key"] * slots, *["value"] * slots]
        sizes = [self.embed_dim, *[self.kdim] * slots, *[self.vdim] * slots]
        for t, name, size in zip(tensors, names, sizes):
            if t.shape[-1] != size:
                which = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
                raise InputError(f"{name} has {t.shape[-1]} features (shape {tuple(t.shape)}) but the module has "
                                 f"{which}={size}")
            if t.dtype != weight.dtype or t.device != weight.device:
                raise InputError(
                    f"{name} is {t.dtype} on {t.device} but the parameters are {weight.dtype} on {weight.device}. "
                    f"Fix: {name}.to(module.q_proj.weight) or build the module with dtype=/device="
                )
            if t.shape[0] != tensors[0].shape[0]:
                raise InputError(f"{name} has batch size {t.shape[0]} but query has {tensors[0].shape[0]}")
        for s in range(slots):
            key, value = tensors[1 + s], tensors[1 + slots + s]
            if key.shape[1] != value.shape[1]:
                raise InputError(f"key and value of slot {s} have {key.shape[1]} and {value.shape[1]} tokens; "
                                 "they must be equal")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, H, L, head_dim)."""
        N, L = x.shape[:2]
        return x.reshape(N, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | Sequence[torch.Tensor] | None = None,
        value: torch.Tensor | Sequence[torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool | None = None,
        *,
        return_info: bool = False,
        **spec_options: Any,
    ) -> tuple[torch.Tensor, AttentionInfo | None]:
        """Attend; ``key``/``value`` default to ``query``/``key`` and may be one tensor per slot."""
        if key_padding_mask is not None or attn_mask is not None:
            raise InputError(
                "key_padding_mask / attn_mask are not supported: tensorattn never builds the score "
                "tensor a mask would apply to. Only causal masking is built in (causal=True or "
                "is_causal=True); drop padded keys or use torch.nn.MultiheadAttention"
            )
        if need_weights:
            raise InputError(
                "need_weights=True: the attention weights (n^k entries for order k) are never "
                "materialized. Pass need_weights=False; return_info=True gives the plan and bounds"
            )
        keys = self._slots(key, "key", query)
        values = self._slots(value, "value", query if key is None else key)
        unbatched = query.dim() == 2
        tensors = [query, *keys, *values]
        for t, name in zip(tensors, ["query", *["key"] * len(keys), *["value"] * len(values)]):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if unbatched:
            tensors = [t.unsqueeze(0) for t in tensors]
        elif not self.batch_first:
            tensors = [t.transpose(0, 1) for t in tensors]
        for t, name in zip(tensors, ["query", *["key"] * len(keys), *["value"] * len(values)]):
            if t.dim() != 3:
                layout = "batch, seq" if self.batch_first else "seq, batch"
                raise InputError(
                    f"{name} has shape {tuple(t.shape)}; expected 3 dims ({layout}, features) or 2 "
                    "dims (seq, features) for an unbatched input"
                )
        slots = len(keys)
        self._check_inputs(tensors, slots)
        q_in, k_in, v_in = tensors[0], tensors[1: 1 + slots], tensors[1 + slots:]
        q = self._heads(self.q_proj(q_in))
        ks = [self._heads(proj(x)) for proj, x in zip(self.k_proj, k_in)]
        vs = [self._heads(proj(x)) for proj, x in zip(self.v_proj, v_in)]
        if self.qk_norm is not None:
            q = F.normalize(q, dim=-1) * self.qk_norm
            ks = [F.normalize(x, dim=-1) * self.qk_norm for x in ks]
        k_arg, v_arg = (ks[0], vs[0]) if slots == 1 else (ks, vs)
        res = self._attend(q, k_arg, v_arg, is_causal, return_info, spec_options)
        out, info = res if return_info else (res, None)
        N, L = q_in.shape[:2]
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, info

    def extra_repr(self) -> str:
        dims = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            dims += f", kdim={self.kdim}, vdim={self.vdim}"
        norm = "" if self.qk_norm is None else f", qk_norm={self.qk_norm:g}"
        return f"{dims}, {self._spec_repr()}, batch_first={self.batch_first}{norm}"
