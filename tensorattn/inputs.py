"""Frontend boundary: validate user arrays, convert them to torch and flatten the batch dims.

Everything after this module sees torch tensors shaped ``(Z, tokens, features...)`` where ``Z`` is
the product of the leading (batch, head) dims.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch

from . import masks, positional
from .errors import InputError
from .request import Request, default_scale
from .spec import Spec


@dataclass(frozen=True)
class Operands:
    """Validated inputs in the compute layout, plus what is needed to restore the caller's type.

    Arrays are ``(Z, tokens, features...)`` with ``Z`` the product of the leading dims; RoPE
    rotations are already applied. ``scale`` is resolved (1/sqrt(D) by default), positions are
    ``q_offset + arange(n)`` for queries and ``k_offsets[slot] + arange(m)`` for keys."""

    spec: Spec
    q: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    lead: tuple[int, ...]
    n: int
    ms: tuple[int, ...]
    sizes: dict[str, int]
    value_sizes: dict[str, int]
    scale: float
    causal: bool
    q_offset: int = 0
    #: global position of each key slot's first token (sequence-parallel shards); () means all 0
    k_offsets: tuple[int, ...] = ()
    rel: torch.Tensor | None = None
    alibi_slope: float = 0.0
    kind: str = "torch"
    out_dtype: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: per key slot, the key mask as an additive bias (Z, m_s) in the compute dtype (0 keeps a key,
    #: -inf drops it, other values of a float mask bias it), or None; () when no key is masked
    key_bias: tuple[torch.Tensor | None, ...] = ()
    #: a general mask (one bias per query and key tuple), read per tile by the exact backend
    attn_mask: masks.AttnMask | None = None
    #: (array, max |entry|) of the arrays above whose maximum ``prepare`` measured while checking
    #: them for NaN/Inf; the bounds reuse it for the very same array object (``known_max``)
    maxabs: tuple[tuple[torch.Tensor, float], ...] = field(default=(), compare=False, repr=False)
    #: the caller's dtype of q, each key and each value, by name: their gradients are cast back to it
    input_dtypes: tuple[str, ...] = ()

    def known_max(self, t: torch.Tensor) -> float | None:
        """max |entry| of ``t`` when ``prepare`` measured it already, else None."""
        for a, top in self.maxabs:
            if a is t:
                return top
        return None

    @property
    def order(self) -> int:
        return self.spec.order

    @cached_property
    def D(self) -> int:
        return self.spec.feature_dim(self.sizes)

    @property
    def m(self) -> int:
        return max(self.ms)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def out_dtype_name(self) -> str:
        """The dtype of the result, by name ("float16", "bfloat16", "float32" or "float64")."""
        return str(self.out_dtype).rsplit(".", 1)[-1]

    @cached_property
    def out_value_shape(self) -> tuple[int, ...]:
        return tuple(self.value_sizes[c] for c in self.spec.value_einsum.out_letters)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.q, *self.keys, *self.values] + ([self.rel] if self.rel is not None else [])

    @property
    def tracks_grad(self) -> bool:
        """True when autograd records this call (grad mode on and an input requires grad)."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors)

    @property
    def key_mask(self) -> str | None:
        """None (no key mask), "binary" (every bias 0 or -inf: key weights 0/1) or "additive"."""
        biases = [b for b in self.key_bias if b is not None]
        if not biases:
            return None
        return "binary" if all(masks.is_binary(b) for b in biases) else "additive"

    def visible_rows(self) -> torch.Tensor | None:
        """(Z, n) bool, True where a query sees an unmasked key tuple; None without a key mask."""
        return masks.visible_rows(self.key_bias, self.n, self.causal, self.q_positions(),
                                  [self.k_positions(s) for s in range(len(self.ms))])

    def to(self, dtype: torch.dtype) -> "Operands":
        """These operands with every tensor in ``dtype`` (differentiable casts)."""
        if dtype == self.q.dtype:
            return self
        rel = None if self.rel is None else self.rel.to(dtype)
        return dataclasses.replace(self, q=self.q.to(dtype), keys=tuple(t.to(dtype) for t in self.keys),
                                   values=tuple(t.to(dtype) for t in self.values), rel=rel)

    def q_positions(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.q.device) + self.q_offset

    def k_positions(self, slot: int = 0) -> torch.Tensor:
        offset = self.k_offsets[slot] if self.k_offsets else 0
        return torch.arange(self.ms[slot], device=self.q.device) + offset

    def restore(self, out: torch.Tensor):
        """Reshape ``(Z, n, *vals)`` to the caller's leading dims, dtype, device and array type."""
        out = out.reshape(*self.lead, self.n, *self.out_value_shape)
        if self.kind == "numpy":
            return out.detach().cpu().numpy().astype(self.out_dtype, copy=False)
        return out.to(self.out_dtype)


#: dtypes an operand may have: torch's and numpy's float16/32/64, and torch bfloat16
SUPPORTED_DTYPES = "float16, bfloat16 (torch), float32 and float64"
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_FLOATS = ("float16", "float32", "float64")


def _unsupported(name: str, dtype: Any) -> InputError:
    return InputError(
        f"{name} has dtype {dtype}; supported dtypes are {SUPPORTED_DTYPES}. Fix: cast with "
        f"{name}.astype('float32') (numpy) or {name}.float() (torch)"
    )


def to_tensor(x: Any, name: str) -> tuple[torch.Tensor, str]:
    """``x`` as a strided CPU/GPU tensor of a supported float dtype, and "torch" or "numpy"."""
    if isinstance(x, torch.Tensor):
        if x.is_nested or x.layout != torch.strided:
            kind = "a nested tensor" if x.is_nested else f"a {x.layout} tensor"
            raise InputError(f"{name} is {kind}; attention needs dense tensors. Fix: {name}.to_dense() "
                             "(sparse) or pad a nested tensor to a dense one")
        if x.device.type == "meta":
            raise InputError(f"{name} is a meta tensor (shape {tuple(x.shape)}, no data); attention reads the "
                             "values (their norms choose the plan). Fix: pass a tensor on a real device")
        if x.dtype not in _TORCH_FLOATS:
            raise _unsupported(name, x.dtype)
        return x, "torch"
    if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
        raise InputError(f"{name} is a masked array with masked entries; attention has no notion of a masked "
                         f"entry. Fix: {name}.filled(value) or drop the masked tokens")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # a ragged list, an object that is not an array, ...
        raise InputError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype == object:
        raise InputError(f"{name} must be a numeric array, got an object array")
    if arr.ndim == 0:
        raise InputError(f"{name} is a scalar ({arr.item()!r}); attention needs an array shaped "
                         f"(..., tokens, features)")
    if arr.dtype.kind != "f" or arr.dtype.name not in _NUMPY_FLOATS:
        raise _unsupported(name, arr.dtype)
    arr = np.ascontiguousarray(arr)
    if any(stride < 0 for stride in arr.strides):  # numpy calls a reversed length-1 axis contiguous
        arr = arr.copy()
    return torch.from_numpy(arr), "numpy"


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for this device type ("cpu", "cuda" ...)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a torch without the device_type argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _autocast_kinds(device: torch.device | str) -> list[str]:
    return [t for t in dict.fromkeys(("cpu", torch.device(device).type)) if autocast_on(t)]


def lasting() -> contextlib.AbstractContextManager:
    """The context for making a tensor kept across calls (a cache, a reused buffer): outside
    inference mode, so that a later call that takes gradients can save it; nothing to do outside
    inference mode. (``approx.features.factor_table``, below this module, leaves inference mode
    itself.)"""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


#: 2^-140, a float32 subnormal (made on first use)
_SUBNORMAL: list = []


def flushes_subnormals() -> bool:
    """Whether this thread's CPU flushes subnormal numbers to zero (``torch.set_flush_denormal``):
    2^-140 + 2^-140 comes out 0 then."""
    if not _SUBNORMAL:
        with lasting():
            _SUBNORMAL.append(torch.tensor(2.0 ** -140, dtype=torch.float32))
    t = _SUBNORMAL[0]
    return float(torch.add(t, t)) == 0.0


def _reductions(device: torch.device | str) -> tuple[list[str], bool, bool]:
    """What would now compute below the dtypes' own precision on ``device``: the device types with
    autocast on, a float32 matmul precision below "highest", subnormals flushed to zero."""
    return _autocast_kinds(device), torch.get_float32_matmul_precision() != "highest", flushes_subnormals()


def precision_reduced(device: torch.device | str) -> bool:
    """Whether any of ``_reductions`` applies: ``full_precision`` is not a no-op."""
    return any(_reductions(device))


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off (on ``device``'s type and the CPU), float32 matrix products in full float32 and
    subnormal numbers kept while the library computes.

    Every result is computed in the dtypes its plan chose and certified (docs/design.md#numerics).
    Under ``torch.autocast`` (mixed-precision training) torch would run the library's matrix
    products in float16 or bfloat16 instead, and with ``torch.set_float32_matmul_precision("high")``
    (or ``"medium"``; TF32 on NVIDIA GPUs, bfloat16 passes on some CPUs) its float32 products with
    about 10 significant bits: a certificate would then bound an error it never saw. The inputs keep
    their dtypes: half-precision inputs get the half-precision certificates. With
    ``torch.set_flush_denormal(True)`` the CPU would read and write subnormal numbers as 0: the
    input maxima, and every result below float32's normal range, would be off by more than the
    certificates allow (1e-40 against bounds of 1e-45), so subnormals are kept for the call. The
    matmul precision is process-wide and the flush mode per thread in torch; both are set for the
    call and restored after it. Costs four small checks when none of this is in use."""
    kinds, reduced, flush = _reductions(device)
    if not kinds and not reduced and not flush:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for t in kinds:
        stack.enter_context(torch.autocast(device_type=t, enabled=False))
    if reduced:
        stack.enter_context(_highest_matmul_precision())
    if flush:
        stack.enter_context(_gradual_underflow())
    return stack


@contextlib.contextmanager
def _gradual_underflow():
    torch.set_flush_denormal(False)
    try:
        yield
    finally:
        torch.set_flush_denormal(True)


@contextlib.contextmanager
def _highest_matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def full_precision_backward(backward):
    """``full_precision`` for the ``backward`` of an autograd.Function, on the device of its first
    incoming gradient: a backward that runs inside an autocast region computes as planned too."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with full_precision(device):
            return backward(ctx, *grads)

    return wrapped


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _TORCH_FLOATS:
        raise _unsupported(name, t.dtype)


def _extremes(t: torch.Tensor) -> float:
    """max |entry| of a non-empty tensor from one min/max pass (NaN if it has a NaN entry, inf if
    an infinite one). ``torch.aminmax`` is a vectorized reduction without a temporary; the inf-norm
    kernels are not (10x slower on CPU from 32K entries on)."""
    lo, hi = (float(x) for x in torch.aminmax(t.detach()))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def max_abs(tensors: list[torch.Tensor]) -> list[float]:
    """max |entry| of every tensor (0.0 for an empty one; NaN or inf where it has a non-finite
    entry), one reduction each."""
    return [_extremes(t) if t.numel() else 0.0 for t in tensors]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (max |entry| is finite iff every entry
    is; NaN propagates through it), outside any graph."""
    return t.numel() == 0 or math.isfinite(_extremes(t))


def check_finite(t: torch.Tensor, name: str) -> None:
    t = t.detach()  # a check, not part of the graph autograd keeps
    if all_finite(t):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        first = tuple(int(i) for i in bad[0])
        raise InputError(
            f"{name} contains {bad.shape[0]} non-finite entr{'y' if bad.shape[0] == 1 else 'ies'} "
            f"(NaN/Inf), first at index {first} (value {t[first].item()}); attention needs finite "
            "inputs. Fix: clean the input, e.g. torch.nan_to_num, or find where it overflowed"
        )


def as_list(x: Any, name: str, count: int, spec: Spec) -> list:
    if spec.order == 2:
        # k=(k1,) is accepted; a sequence of several arrays is a mistake; any other list is an array literal
        if isinstance(x, (list, tuple)) and x and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in x):
            if len(x) == 1:
                return [x[0]]
            raise InputError(
                f"spec {spec.name!r} has order 2 and takes one {name} array ({name} shaped (..., m, "
                f"{'d' if name == 'k' else 'e'})), but {name} is a {type(x).__name__} of {len(x)} arrays. A "
                f"sequence of {name} arrays, one per key slot, is for higher-order specs such as "
                f"spec='triple' ({name}=({name}1, {name}2))"
            )
        return [x]
    if not isinstance(x, (list, tuple)):
        raise InputError(
            f"spec {spec.name!r} has order {spec.order} and needs {name} as a sequence of {count} "
            f"arrays ({name}=({', '.join(f'{name}{i + 1}' for i in range(count))})), got a single "
            f"{type(x).__name__}"
        )
    if len(x) != count:
        raise InputError(
            f"spec {spec.name!r} has order {spec.order} and needs {count} {name} array(s), got "
            f"{len(x)}; pass {name}=({', '.join(f'{name}{i + 1}' for i in range(count))})"
        )
    return list(x)


def _shapes(spec: Spec, shapes: list[tuple[int, ...]], names: list[str]) -> tuple[tuple[int, ...], dict[str, int]]:
    """Leading dims (equal for every operand) and the size of every feature index (for a slot that
    concatenates per-term blocks, the size of each block letter too), from the operands' shapes."""
    se = spec.slots
    sizes: dict[str, int] = {}
    lead: tuple[int, ...] | None = None
    for slot, (shape, nm, feats) in enumerate(zip(shapes, names, se.features)):
        need = 1 + len(feats)
        ndim = len(shape)
        if ndim == 0:
            raise InputError(f"{nm} is a scalar (0-dim tensor); attention needs an array shaped "
                             f"(..., tokens, {', '.join(feats)})")
        if ndim < need:
            raise InputError(
                f"{nm} has shape {tuple(shape)} but spec {spec.name!r} operand "
                f"{se.operands[slot]!r} needs at least {need} dims (..., tokens, {', '.join(feats)})"
            )
        this_lead = tuple(shape[: ndim - need])
        if lead is None:
            lead = this_lead
        elif this_lead != lead:
            raise InputError(
                f"leading (batch/head) dims of {nm} are {this_lead} but q has {lead}; they must be "
                "equal (no broadcasting). Fix: expand or reshape so the leading dims match"
            )
        for letter, size in zip(feats, shape[ndim - len(feats):]):
            if size == 0:
                raise InputError(
                    f"{nm} has shape {tuple(shape)}: feature index {letter!r} of spec {spec.name!r} has size 0, "
                    "so every score would be an empty sum (0) and attention a plain average of the values. "
                    "Fix: give every feature index at least one entry"
                )
            if letter in sizes and sizes[letter] != size:
                raise InputError(
                    f"size of index {letter!r} for {nm} ({size}) does not match previous operands "
                    f"({sizes[letter]}); spec {spec.name!r} contracts {letter!r} across operands"
                )
            sizes[letter] = int(size)
    assert lead is not None
    for slot, blocks in enumerate(se.blocks):
        if blocks:
            _block_sizes(spec, slot, blocks, sizes[se.features[slot]], names[slot], sizes)
    return lead, sizes


def term_operands(spec: Spec, sizes: dict[str, int], arrays: list[torch.Tensor], term) -> list[torch.Tensor]:
    """The arrays of one term's operands (slot tiles in ``arrays``, query first): the slot's array,
    or the term's block of a slot that concatenates per-term blocks (a slice of its last axis)."""
    lay = spec.slots
    out = []
    for slot, feats in zip(term.slots, term.einsum.features):
        blocks = lay.blocks[slot]
        x = arrays[slot]
        if blocks:
            start = sum(sizes[b] for b in blocks[: blocks.index(feats)])
            x = x[..., start: start + sizes[feats]]
        out.append(x)
    return out


def expand_operand(t: torch.Tensor, feats: str, contracted: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """(Z, N, *feats) -> (Z, N, D): the operand's value at every contracted index tuple I."""
    Z, N = t.shape[:2]
    if len(feats) == 1 and tuple(feats) == tuple(contracted):  # already (Z, N, D)
        return t
    perm = [feats.index(c) for c in contracted if c in feats]
    t = t.permute(0, 1, *(2 + p for p in perm))
    shape = [Z, N] + [sizes[c] if c in feats else 1 for c in contracted]
    full = [Z, N] + [sizes[c] for c in contracted]
    return t.reshape(shape).expand(full).reshape(Z, N, math.prod(full[2:]))


def _block_sizes(spec: Spec, slot: int, blocks: tuple[str, ...], width: int, name: str,
                 sizes: dict[str, int]) -> None:
    """Split a slot's feature axis into its per-term blocks: given sizes, or equal parts."""
    given = dict(spec.block_sizes or {})
    if all(b in given for b in blocks):
        parts = [given[b] for b in blocks]
        if sum(parts) != width:
            raise InputError(
                f"{name} has {width} features, but spec {spec.name!r} splits slot {spec.tokens[slot]!r} into "
                f"blocks {dict(zip(blocks, parts))} (sum {sum(parts)}); they must add up to its feature size"
            )
    else:
        if width % len(blocks):
            raise InputError(
                f"{name} has {width} features, which do not split equally into the {len(blocks)} blocks "
                f"{list(blocks)} of slot {spec.tokens[slot]!r} (one per term that names it). Fix: use a multiple "
                f"of {len(blocks)} features, or give Spec(..., block_sizes={{...}})"
            )
        parts = [width // len(blocks)] * len(blocks)
    for b, size in zip(blocks, parts):
        if b in sizes and sizes[b] != size:
            raise InputError(
                f"block {b!r} of {name} has {size} features but another operand gives {b!r} size {sizes[b]}; "
                "the terms contract it across operands, so the sizes must agree"
            )
        sizes[b] = size


def _value_sizes(spec: Spec, values: list[tuple[int, ...]], names: list[str], knames: list[str],
                 lead: tuple[int, ...], ms: tuple[int, ...]) -> dict[str, int]:
    ve = spec.value_einsum
    value_sizes: dict[str, int] = {}
    for slot, (shape, nm, letters) in enumerate(zip(values, names, ve.value_letters)):
        want = len(lead) + 1 + len(letters)
        if len(shape) != want or tuple(shape[: len(lead)]) != lead or shape[len(lead)] != ms[slot]:
            raise InputError(
                f"{nm} has shape {tuple(shape)} but needs {(*lead, ms[slot], *(['*'] * len(letters)))} "
                f"(leading dims of q, the {ms[slot]} tokens of {knames[slot]}, then value index "
                f"{', '.join(letters) or 'none'} of {ve.operands[slot]!r})"
            )
        for letter, size in zip(letters, shape[len(lead) + 1:]):
            if letter in value_sizes and value_sizes[letter] != size:
                raise InputError(
                    f"size of value index {letter!r} for {nm} ({size}) does not match previous "
                    f"value operands ({value_sizes[letter]})"
                )
            value_sizes[letter] = int(size)
    return value_sizes


def check_positions(n: int, ms: tuple[int, ...], causal: bool, q_offset: int | None) -> None:
    if not causal or q_offset is not None or all(m == n for m in ms):
        return
    shown = ms[0] if len(set(ms)) == 1 else ms
    what = "k has" if len(ms) == 1 else "the key slots have"
    if all(m >= n for m in ms):
        fix = (f"for decoding with a KV cache pass q_offset={max(ms) - n} (= m - n, so the queries sit at the end "
               f"of the {max(ms)} keys)")
    else:
        fix = ("with fewer keys than queries pass q_offset=<position of the first query> (q_offset=0 if query 0 "
               "and key 0 are the same position; queries past the last key then see every key)")
    raise InputError(
        f"causal=True needs as many keys as queries, but q has n={n} and {what} m={shown}; {fix}, or use causal=False"
    )


def _prepare_masks(key_padding_mask, attn_mask, request: Request, lead: tuple[int, ...], n: int,
                   ms: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """Key biases per slot, the general mask (or None), and whether the call is causal.

    A general mask that broadcasts over queries is a key mask (poly serves it); one that equals
    the causal mask runs as ``causal=True``; with ``request.causal`` the mask must be the causal
    mask (torch's ``is_causal`` hint), and is checked to be."""
    nk = len(ms)
    biases: list[torch.Tensor | None] = [None] * nk

    def add(slot: int, bias: torch.Tensor) -> None:
        biases[slot] = bias if biases[slot] is None else biases[slot] + bias

    if key_padding_mask is not None:
        per_slot = nk > 1 and isinstance(key_padding_mask, (list, tuple)) and len(key_padding_mask) == nk and all(
            p is None or isinstance(p, (torch.Tensor, np.ndarray)) for p in key_padding_mask)
        for slot in range(nk):
            x = key_padding_mask[slot] if per_slot else key_padding_mask
            if x is not None:
                name = f"key_padding_mask[{slot}]" if per_slot else "key_padding_mask"
                add(slot, masks.key_bias(x, name, lead, ms[slot], dtype, device))
    causal, general = request.causal, None
    if attn_mask is not None:
        mask = masks.attn_mask(attn_mask, "attn_mask", lead, n, ms, device)
        L = len(lead)
        offset = request.q_offset or 0
        if request.causal:
            is_causal, where = masks.scan(mask, n, ms, offset, "attn_mask")
            if not is_causal:
                raise InputError(
                    f"causal=True (is_causal=True) declares attn_mask to be the causal mask (key j visible to "
                    f"query i iff j <= i{f' + {offset}' if offset else ''}), but it is not: {where}. Fix: pass "
                    "causal=False (is_causal=False) to apply attn_mask as given, or drop attn_mask"
                )
        elif (nk == 1 or not mask.joint) and all(p.shape[L] == 1 for p in mask.parts):
            masks.scan(mask, n, ms, None, "attn_mask")
            for slot, part in enumerate(mask.parts):  # one row for every query: a key mask
                row = part.select(L, 0)
                add(slot, masks.key_bias(row.expand(*row.shape[:-1], ms[slot]), "attn_mask", lead, ms[slot],
                                         dtype, device))
        else:
            is_causal, _ = masks.scan(mask, n, ms, offset, "attn_mask")
            causal, general = (True, None) if is_causal else (False, mask)
    key_bias = tuple(biases) if any(b is not None for b in biases) else ()
    return key_bias, general, causal


@dataclass(frozen=True)
class _Layout:
    """What a call's shapes and settings determine: the leading dims, token counts, index sizes and
    the resolved scale."""

    lead: tuple[int, ...]
    n: int
    ms: tuple[int, ...]
    sizes: dict[str, int]
    value_sizes: dict[str, int]
    D: int
    scale: float


@lru_cache(maxsize=256)
def _layout(spec: Spec, q_shape: tuple[int, ...], k_shapes: tuple[tuple[int, ...], ...],
            v_shapes: tuple[tuple[int, ...], ...], causal: bool, q_offset: int | None,
            scale: float | None) -> _Layout:
    """The shape checks of ``prepare`` and what they find, once per distinct set of shapes (a model
    calls with the same shapes layer after layer); a refused set raises every time."""
    nk = spec.order - 1
    knames = ["k"] if nk == 1 else [f"k[{i}]" for i in range(nk)]
    vnames = ["v"] if nk == 1 else [f"v[{i}]" for i in range(nk)]
    lead, sizes = _shapes(spec, [q_shape, *k_shapes], ["q", *knames])
    n = int(q_shape[len(lead)])
    ms = tuple(int(shape[len(lead)]) for shape in k_shapes)
    for nm, shape, m in zip(knames, k_shapes, ms):
        if m == 0:
            raise InputError(
                f"{nm} has 0 tokens (shape {tuple(shape)}); softmax over an empty key set is "
                "undefined. Fix: pass at least one key"
            )
    value_sizes = _value_sizes(spec, list(v_shapes), vnames, knames, lead, ms)
    check_positions(n, ms, causal, q_offset)
    D = spec.feature_dim(sizes)
    return _Layout(lead, n, ms, sizes, value_sizes, D, default_scale(D) if scale is None else scale)


def prepare(spec: Spec, q, k, v, request: Request, spec_options: dict[str, Any] | None = None, *,
            k_offsets: tuple[int, ...] = (), key_padding_mask: Any = None, attn_mask: Any = None) -> Operands:
    """Validate and convert user arrays for ``spec`` under ``request``; apply RoPE rotations.

    ``spec_options`` are the spec's own options (``rope_base``, ``rel`` ...; defaults from the
    spec). ``k_offsets`` are the global positions of each key slot's first token (a
    sequence-parallel shard's start); they move key positions for rotations and causal masks the
    way ``request.q_offset`` moves queries. ``key_padding_mask`` and ``attn_mask`` follow
    ``torch.nn.MultiheadAttention``'s conventions (``tensorattn.masks``)."""
    options = positional.check_options(spec.positional, {**spec.options, **(spec_options or {})})
    nk = spec.order - 1
    ks = as_list(k, "k", nk, spec)
    vs = as_list(v, "v", nk, spec)
    qt, kind = to_tensor(q, "q")
    knames = ["k"] if nk == 1 else [f"k[{i}]" for i in range(nk)]
    vnames = ["v"] if nk == 1 else [f"v[{i}]" for i in range(nk)]
    kts = [to_tensor(x, nm)[0] for x, nm in zip(ks, knames)]
    vts = [to_tensor(x, nm)[0] for x, nm in zip(vs, vnames)]
    for t, nm in zip([qt, *kts, *vts], ["q", *knames, *vnames]):
        _check_float(t, nm)
    out_dtype = qt.numpy().dtype if kind == "numpy" else qt.dtype
    device = qt.device
    for t, nm in zip([*kts, *vts], [*knames, *vnames]):
        if t.device != device:
            raise InputError(f"{nm} is on {t.device} but q is on {device}; move them to one device")

    lay = _layout(spec, tuple(qt.shape), tuple(tuple(t.shape) for t in kts), tuple(tuple(t.shape) for t in vts),
                  request.causal, request.q_offset, request.scale)
    lead, n, ms, scale = lay.lead, lay.n, lay.ms, lay.scale
    q_offset = request.q_offset or 0
    tops = max_abs([qt, *kts, *vts])
    for t, nm, top in zip([qt, *kts, *vts], ["q", *knames, *vnames], tops):
        if not math.isfinite(top):
            check_finite(t, nm)  # raises, naming the first non-finite entry

    compute = torch.float64 if any(t.dtype == torch.float64 for t in [qt, *kts, *vts]) else torch.float32
    Z = math.prod(lead)
    key_bias, general_mask, causal = _prepare_masks(key_padding_mask, attn_mask, request, lead, n, ms, compute,
                                                    device)

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(Z, *t.shape[len(lead):])
        return t if t.dtype == compute else t.to(compute)

    qf, kfs, vfs = flat(qt), [flat(t) for t in kts], [flat(t) for t in vts]
    k_offsets = tuple(int(o) for o in k_offsets) if any(k_offsets) else ()
    maxabs = tuple(zip([qf, *kfs, *vfs], tops))  # the casts to the compute dtype are exact
    rel = None
    if spec.positional == "rope":
        q_pos = torch.arange(n, device=device) + q_offset
        k_pos = [torch.arange(m, device=device) + (k_offsets[s] if k_offsets else 0) for s, m in enumerate(ms)]
        qf, kfs = positional.rotate(qf, kfs, q_pos, k_pos, options)  # new arrays: maxabs no longer names them
    elif spec.positional == "relative":
        W = options.get("rel")
        Wt = None if W is None else to_tensor(W, "rel")[0]
        positional.check_rel(Wt, n, ms[0], lay.sizes["d"], q_offset)
        _check_float(Wt, "rel")
        check_finite(Wt, "rel")
        rel = Wt.to(device=device, dtype=compute)
    return Operands(
        spec=spec, q=qf, keys=tuple(kfs), values=tuple(vfs), lead=lead, n=n, ms=ms, sizes=dict(lay.sizes),
        value_sizes=dict(lay.value_sizes), scale=float(scale), causal=causal, q_offset=q_offset,
        k_offsets=k_offsets, rel=rel, alibi_slope=float(options.get("alibi_slope") or 0.0),
        kind=kind, out_dtype=out_dtype, device=device, key_bias=key_bias, attn_mask=general_mask, maxabs=maxabs,
        input_dtypes=tuple(str(t.dtype).rsplit(".", 1)[-1] for t in [qt, *kts, *vts]),
    )
