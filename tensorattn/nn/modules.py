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
from ..api import attend, weights_for
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
    # Spec keeps its options in a read-only mappingproxy, which does not pickle; store its fields
    return spec.__reduce__()[1]


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

    def _call_request(self, causal: bool | None, call_options: dict) -> tuple[Request, dict]:
        request, options = self.request.with_causal(causal), self.spec_options
        if call_options:  # per-call request knobs or spec options override the module's
            request, options = Request.from_call(
                self.spec, **{f: getattr(request, f) for f in Request.names()}, **self.spec_options, **call_options
            )
        return request, options

    def _attend(self, q, k, v, causal: bool | None, return_info: bool, call_options: dict, masks: dict):
        request, options = self._call_request(causal, call_options)
        return _attend_eager(self.spec, q, k, v, request, options, return_info, masks)

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
def _attend_eager(spec, q, k, v, request, spec_options, return_info, masks):
    """attend() outside any torch.compile graph: the plan reads data (norms -> beta -> degree)
    and runs numpy, so tracing it would only add graph breaks; the projections around it compile."""
    return attend(spec, q, k, v, request, spec_options, return_info=return_info, **masks)


@torch.compiler.disable
def _weights_eager(spec, q, k, request, spec_options, masks):
    return weights_for(spec, q, k, request, spec_options, **masks)


def get_spec_or_none(name: str) -> Spec | None:
    try:
        return get_spec(name)
    except SpecError:
        return None


class TensorAttention(_SpecModule):
    """``ta.attention`` as a module, with no parameters: the spec and options are fixed here.

    ``forward(q, k, v, *, causal=None, return_info=False, key_padding_mask=None, attn_mask=None,
    **spec_options)`` takes arrays laid out as in ``ta.attention`` (``(..., n, d)``; sequences of
    arrays for the keys and values of order > 2) and masks as there, and returns the output, or
    ``(output, info)`` with ``return_info=True``.

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

    def forward(self, q, k, v, *, causal: bool | None = None, return_info: bool = False, key_padding_mask=None,
                attn_mask=None, **spec_options):
        masks = {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask}
        return self._attend(q, k, v, causal, return_info, spec_options, masks)

    def extra_repr(self) -> str:
        return self._spec_repr()


def _one_feature_per_slot(spec: Spec) -> None:
    """MultiheadTensorAttention projects each token to one head_dim vector per slot and combines
    values entrywise; refuse specs whose operands carry other shapes, with the alternative."""
    se, ve = spec.slots, spec.value_einsum
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

    # torch.nn.TransformerEncoder(Layer) read these before taking their fused fast path, which
    # calls torch's own attention kernel; None / False send them down the regular path (to forward)
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False
    #: a list while ``ta.nn.convert`` records the plans of a sample batch, else None
    _recorded: list | None = None

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

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, spec: str | Spec = "pairwise", **options: Any
                   ) -> "MultiheadTensorAttention":
        """A copy of ``torch.nn.MultiheadAttention`` ``mha``: the same sizes, layout
        (``batch_first``), biases, device and dtype, and its weights, from the packed
        ``in_proj_weight`` or the separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` layouts).

        ``options`` are this class's settings (``backend``, ``tol``, ``causal``, ``qk_norm`` ...).
        For an order-k ``spec`` every key (value) slot starts from torch's key (value) projection.
        torch's attention-weight ``dropout`` is not copied (it is never applied here; it has no
        effect in ``eval()`` mode); ``add_bias_kv`` and ``add_zero_attn`` are refused. With
        ``backend="exact"`` the copy computes what ``mha`` computes, to float rounding.

        >>> import torch, tensorattn as ta
        >>> theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        >>> ours = ta.nn.MultiheadTensorAttention.from_torch(theirs, backend="exact")
        >>> x = torch.randn(2, 5, 16)
        >>> bool(torch.allclose(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-6))
        True
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise InputError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise InputError(
                "from_torch: this nn.MultiheadAttention uses add_bias_kv or add_zero_attn (extra learned or zero "
                "key/value tokens appended to every sequence), which MultiheadTensorAttention does not have"
            )
        weight = mha.out_proj.weight
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, spec, bias=bias, batch_first=mha.batch_first, kdim=mha.kdim,
                  vdim=mha.vdim, device=weight.device, dtype=weight.dtype, **options)
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight[:E], mha.in_proj_weight[E: 2 * E], mha.in_proj_weight[2 * E:]
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        with torch.no_grad():
            new.q_proj.weight.copy_(wq)
            for lin in new.k_proj:
                lin.weight.copy_(wk)
            for lin in new.v_proj:
                lin.weight.copy_(wv)
            if bias:
                b = mha.in_proj_bias
                new.q_proj.bias.copy_(b[:E])
                for lin in new.k_proj:
                    lin.bias.copy_(b[E: 2 * E])
                for lin in new.v_proj:
                    lin.bias.copy_(b[2 * E:])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None and mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

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

    def _per_slot(self, mask, name: str, slots: int, one: str) -> tuple[list, bool]:
        """The masks to convert and whether there is one per key slot (a sequence, for order > 2)."""
        per_slot = slots > 1 and isinstance(mask, (list, tuple))
        if per_slot and len(mask) != slots:
            raise InputError(
                f"{name} is a sequence of {len(mask)} masks but spec {self.spec.name!r} has {slots} key slots; "
                f"pass {one} or one per slot"
            )
        return (list(mask) if per_slot else [mask]), per_slot

    def _key_padding(self, mask, unbatched: bool, slots: int):
        """torch's (N, S) key padding mask (or (S,) unbatched), per slot, as (N, 1, S): one row per
        batch element, shared by the heads."""
        if mask is None:
            return None
        masks, per_slot = self._per_slot(mask, "key_padding_mask", slots, "one mask (shared by every slot)")
        out = []
        for t in masks:
            if t is None:
                out.append(None)
                continue
            want = 1 if unbatched else 2
            if not isinstance(t, torch.Tensor) or t.dim() != want:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(
                    f"key_padding_mask has shape {shape}; nn.MultiheadAttention's layout is (batch, keys) "
                    "(or (keys,) for an unbatched input), True or -inf marking a padded key"
                )
            out.append(t[None, None] if unbatched else t[:, None])
        return tuple(out) if per_slot else out[0]

    def _attn_mask(self, mask, unbatched: bool, N: int, slots: int):
        """torch's (L, S) or (N * H, L, S) attention mask as (..., L, S) over (N, H); an order-k
        spec applies it to every key slot (a key tuple is masked when any of its keys is)."""
        if mask is None:
            return None
        masks, per_slot = self._per_slot(mask, "attn_mask", slots, "one (L, S) mask (applied to every slot)")
        out = []
        for t in masks:
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(
                    f"attn_mask has shape {shape}; nn.MultiheadAttention's layouts are (L, S) and "
                    f"(batch * num_heads, L, S), True or -inf marking a pair that may not attend"
                )
            if t.dim() == 3:
                rows = 1 if unbatched else N
                if t.shape[0] != rows * self.num_heads:
                    raise InputError(
                        f"attn_mask has shape {tuple(t.shape)}; a 3-D mask must be (batch * num_heads, L, S) "
                        f"= ({rows * self.num_heads}, L, S)"
                    )
                t = t.reshape(rows, self.num_heads, *t.shape[1:])
            out.append(t)
        return tuple(out) if per_slot else (tuple(out * slots) if slots > 1 else out[0])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | Sequence[torch.Tensor] | None = None,
        value: torch.Tensor | Sequence[torch.Tensor] | None = None,
        key_padding_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        average_attn_weights: bool = True,
        is_causal: bool | None = None,
        *,
        return_info: bool = False,
        **spec_options: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Attend; ``key``/``value`` default to ``query``/``key`` and may be one tensor per slot.

        Returns ``(output, weights)`` where weights is None unless ``need_weights=True``, or
        ``(output, info)`` with ``return_info=True``."""
        if need_weights and return_info:
            raise InputError("need_weights=True and return_info=True both fill the second output; pass one of them")
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
        N, L = q_in.shape[:2]
        masks = {"key_padding_mask": self._key_padding(key_padding_mask, unbatched, slots),
                 "attn_mask": self._attn_mask(attn_mask, unbatched, N, slots)}
        request, options = self._call_request(is_causal, spec_options)
        if need_weights:
            if request.backend not in ("auto", "exact"):
                raise InputError(
                    f"need_weights=True: backend={request.backend!r} never forms the attention weights "
                    "(n^k numbers per head for order k). Fix: backend='exact' (or 'auto', which then runs "
                    "exact for this call); return_info=True gives the plan and its bounds instead"
                )
            request = dataclasses.replace(request, backend="exact")
        q = self._heads(self.q_proj(q_in))
        ks = [self._heads(proj(x)) for proj, x in zip(self.k_proj, k_in)]
        vs = [self._heads(proj(x)) for proj, x in zip(self.v_proj, v_in)]
        if self.qk_norm is not None:
            q = F.normalize(q, dim=-1) * self.qk_norm
            ks = [F.normalize(x, dim=-1) * self.qk_norm for x in ks]
        k_arg, v_arg = (ks[0], vs[0]) if slots == 1 else (ks, vs)
        recording = self._recorded is not None
        res = _attend_eager(self.spec, q, k_arg, v_arg, request, options, return_info or recording, masks)
        out, info = res if (return_info or recording) else (res, None)
        if recording:
            self._recorded.append(info)
            info = info if return_info else None
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if need_weights:
            weights = _weights_eager(self.spec, q, k_arg, request, options, masks)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            return out, (weights.squeeze(0) if unbatched else weights)
        return out, info

    def extra_repr(self) -> str:
        dims = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            dims += f", kdim={self.kdim}, vdim={self.vdim}"
        norm = "" if self.qk_norm is None else f", qk_norm={self.qk_norm:g}"
        return f"{dims}, {self._spec_repr()}, batch_first={self.batch_first}{norm}"
