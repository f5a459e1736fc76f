"""Frontend boundary: validate user arrays, convert to torch, flatten batch dims, apply positions.

Everything after this module sees torch tensors shaped ``(Z, tokens, features...)`` where ``Z`` is
the product of the leading (batch, head) dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError, closest_names
from .spec import Spec

#: options every spec accepts (backend knobs); spec-specific ones come from ``Spec.options``.
COMMON_OPTIONS: dict[str, Any] = {
    "max_degree": 40,
    "max_rank": 1 << 21,
    "approximant": "chebyshev",
    "q_offset": None,
    "memory_budget": 64 << 20,
    "features": None,
    "seed": 0,
    "need_grad": None,
}

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Operands:
    """Validated inputs in the compute layout, plus what is needed to restore the caller's type."""

    spec: Spec
    q: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lead: tuple[int, ...]
    n: int
    ms: tuple[int, ...]
    sizes: dict[str, int]
    value_sizes: dict[str, int]
    scale: float
    causal: bool
    q_offset: int
    options: dict[str, Any]
    rel: torch.Tensor | None = None
    #: global position of each key slot's first token (sequence-parallel shards); () means all 0
    k_offsets: tuple[int, ...] = ()
    kind: str = "torch"
    out_dtype: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def order(self) -> int:
        return self.spec.order

    @property
    def D(self) -> int:
        return self.spec.feature_dim(self.sizes)

    @property
    def m(self) -> int:
        return max(self.ms)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def out_value_shape(self) -> tuple[int, ...]:
        return tuple(self.value_sizes[c] for c in self.spec.value_einsum.out_letters)

    @property
    def requires_grad(self) -> bool:
        flag = self.options.get("need_grad")
        if flag is not None:
            return bool(flag)
        tensors = [self.q, *self.keys, *self.values] + ([self.rel] if self.rel is not None else [])
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

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


def resolve_options(spec: Spec, options: dict[str, Any]) -> dict[str, Any]:
    valid = {**COMMON_OPTIONS, **spec.options}
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise InputError(
            f"unknown option {unknown[0]!r} for spec {spec.name!r}; valid options are "
            f"{closest_names(unknown[0], valid)}"
        )
    return {**valid, **options}


def _to_tensor(x: Any, name: str) -> tuple[torch.Tensor, str]:
    if isinstance(x, torch.Tensor):
        return x, "torch"
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype == object:
        raise InputError(f"{name} must be a numeric array, got an object array")
    return torch.from_numpy(np.ascontiguousarray(arr)), "numpy"


def _check_float(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise InputError(
            f"{name} has dtype {t.dtype}; attention needs floating-point inputs. Fix: cast with "
            f"{name}.astype('float32') (numpy) or {name}.float() (torch)"
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    with torch.no_grad():  # a check, not part of the graph autograd keeps
        finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        first = tuple(int(i) for i in bad[0])
        raise InputError(
            f"{name} contains {bad.shape[0]} non-finite entr{'y' if bad.shape[0] == 1 else 'ies'} "
            f"(NaN/Inf), first at index {first} (value {t[first].item()}); attention needs finite "
            "inputs. Fix: clean the input, e.g. torch.nan_to_num, or find where it overflowed"
        )


def _as_list(x: Any, name: str, count: int, spec: Spec) -> list:
    if spec.order == 2:
        # k=(k1,) is accepted; any other list is an array literal
        if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], (np.ndarray, torch.Tensor)):
            return [x[0]]
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


def prepare(spec: Spec, q, k, v, *, causal: bool, scale: float | None, options: dict,
            k_offset: int = 0) -> Operands:
    """Validate and convert user arrays for ``spec``; apply RoPE rotations.

    ``k_offset`` is the global position of the first key (a sequence-parallel shard's start); it
    moves key positions for rotations and causal masks the way ``q_offset`` moves queries."""
    se, ve = spec.score_einsum, spec.value_einsum
    nk = spec.order - 1
    ks = _as_list(k, "k", nk, spec)
    vs = _as_list(v, "v", nk, spec)
    qt, kind = _to_tensor(q, "q")
    knames = ["k"] if nk == 1 else [f"k[{i}]" for i in range(nk)]
    vnames = ["v"] if nk == 1 else [f"v[{i}]" for i in range(nk)]
    kts = [_to_tensor(x, nm)[0] for x, nm in zip(ks, knames)]
    vts = [_to_tensor(x, nm)[0] for x, nm in zip(vs, vnames)]
    for t, nm in zip([qt, *kts, *vts], ["q", *knames, *vnames]):
        _check_float(t, nm)
    out_dtype = qt.numpy().dtype if kind == "numpy" else qt.dtype
    device = qt.device
    for t, nm in zip([*kts, *vts], [*knames, *vnames]):
        if t.device != device:
            raise InputError(f"{nm} is on {t.device} but q is on {device}; move them to one device")

    # shapes: operand m is (..., tokens, *features)
    sizes: dict[str, int] = {}
    lead: tuple[int, ...] | None = None
    arrays = [qt, *kts]
    names = ["q", *knames]
    for slot, (t, nm, feats) in enumerate(zip(arrays, names, se.features)):
        need = 1 + len(feats)
        if t.ndim < need:
            raise InputError(
                f"{nm} has shape {tuple(t.shape)} but spec {spec.name!r} operand "
                f"{se.operands[slot]!r} needs at least {need} dims (..., tokens, {', '.join(feats)})"
            )
        this_lead = tuple(t.shape[: t.ndim - need])
        if lead is None:
            lead = this_lead
        elif this_lead != lead:
            raise InputError(
                f"leading (batch/head) dims of {nm} are {this_lead} but q has {lead}; they must be "
                "equal (no broadcasting). Fix: expand or reshape so the leading dims match"
            )
        for letter, size in zip(feats, t.shape[t.ndim - len(feats):]):
            if letter in sizes and sizes[letter] != size:
                raise InputError(
                    f"size of index {letter!r} for {nm} ({size}) does not match previous operands "
                    f"({sizes[letter]}); spec {spec.score!r} contracts {letter!r} across operands"
                )
            sizes[letter] = int(size)
    assert lead is not None
    n = int(qt.shape[len(lead)])
    ms = tuple(int(t.shape[len(lead)]) for t in kts)
    for nm, m in zip(knames, ms):
        if m == 0:
            raise InputError(
                f"{nm} has 0 tokens (shape {tuple(kts[knames.index(nm)].shape)}); softmax over an "
                "empty key set is undefined. Fix: pass at least one key"
            )
    value_sizes: dict[str, int] = {}
    for slot, (t, nm, letters) in enumerate(zip(vts, vnames, ve.value_letters)):
        want = len(lead) + 1 + len(letters)
        if t.ndim != want or tuple(t.shape[: len(lead)]) != lead or t.shape[len(lead)] != ms[slot]:
            raise InputError(
                f"{nm} has shape {tuple(t.shape)} but needs {(*lead, ms[slot], *(['*'] * len(letters)))} "
                f"(leading dims of q, the {ms[slot]} tokens of {knames[slot]}, then value index "
                f"{', '.join(letters) or 'none'} of {ve.operands[slot]!r})"
            )
        for letter, size in zip(letters, t.shape[len(lead) + 1:]):
            if letter in value_sizes and value_sizes[letter] != size:
                raise InputError(
                    f"size of value index {letter!r} for {nm} ({size}) does not match previous "
                    f"value operands ({value_sizes[letter]})"
                )
            value_sizes[letter] = int(size)

    q_offset = options.get("q_offset")
    if q_offset is not None:
        if not isinstance(q_offset, (int, np.integer)) or isinstance(q_offset, bool) or q_offset < 0:
            raise InputError(
                f"q_offset={q_offset!r} must be a non-negative int: the position of the first query "
                "(queries sit at q_offset..q_offset+n-1, keys at 0..m-1)"
            )
    if causal and q_offset is None and any(m != n for m in ms):
        raise InputError(
            f"causal=True needs as many keys as queries, but q has n={n} and k has m="
            f"{ms[0] if len(set(ms)) == 1 else ms}; for decoding with a KV cache pass "
            f"q_offset=m-n (= {ms[0] - n}) so queries sit at the end, or use causal=False"
        )
    q_offset = int(q_offset or 0)

    for t, nm in zip([qt, *kts, *vts], ["q", *knames, *vnames]):
        check_finite(t, nm)

    D = spec.feature_dim(sizes)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise InputError(f"scale={scale!r} must be a finite number (default 1/sqrt(D) = {1 / math.sqrt(D):.4g})")

    compute = torch.float64 if any(t.dtype == torch.float64 for t in [qt, *kts, *vts]) else torch.float32
    Z = math.prod(lead)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(Z, *t.shape[len(lead):]).to(compute)

    ops = Operands(
        spec=spec,
        q=flat(qt),
        keys=[flat(t) for t in kts],
        values=[flat(t) for t in vts],
        lead=lead,
        n=n,
        ms=ms,
        sizes=sizes,
        value_sizes=value_sizes,
        scale=float(scale),
        causal=bool(causal),
        q_offset=q_offset,
        options=options,
        k_offsets=(int(k_offset),) * nk if k_offset else (),
        kind=kind,
        out_dtype=out_dtype,
        device=device,
    )
    if spec.positional == "rope":
        _apply_rope(ops)
    elif spec.positional == "relative":
        _prepare_relative(ops)
    return ops


def rope_angles(positions: torch.Tensor, d: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """theta_l = base^(-2l/d), angle = position * theta_l, shape (len(positions), d/2)."""
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float64, device=positions.device) * 2.0 / d)
    return (positions.to(torch.float64)[:, None] * inv[None, :]).to(dtype)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float, layout: str) -> torch.Tensor:
    """Rotate ``x`` (Z, n, d) by RoPE angles. Interleaved pairs (2l, 2l+1); half pairs (l, l+d/2)."""
    d = x.shape[-1]
    ang = rope_angles(positions, d, base, x.dtype)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(x.shape)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def _apply_rope(ops: Operands) -> None:
    base = ops.options["rope_base"]
    layout = ops.options["rope_layout"]
    if layout not in ("interleaved", "half"):
        raise InputError(
            f"rope_layout={layout!r} is not one of 'interleaved' (pairs 2l, 2l+1) or 'half' "
            "(pairs l, l+d/2)"
        )
    if not isinstance(base, (int, float)) or not base > 0:
        raise InputError(f"rope_base={base!r} must be a positive number (default 10000.0)")
    d = ops.sizes["d"]
    if d % 2:
        raise InputError(f"rope needs an even head dim d to pair coordinates, but q has d={d}")
    ops.q = rope_rotate(ops.q, ops.q_positions(), float(base), layout)
    ops.keys = [rope_rotate(k, ops.k_positions(s), float(base), layout) for s, k in enumerate(ops.keys)]


def _prepare_relative(ops: Operands) -> None:
    W = ops.options["rel"]
    d, n, m = ops.sizes["d"], ops.n, ops.ms[0]
    L = ops.q_offset + n + m - 1
    if W is None:
        raise InputError(
            f"spec 'relative' needs rel=W with shape ({L}, {d}, {d}) = (q_offset+n+m-1, d, d): "
            "W[i-j+m-1] is the matrix between query i and key j"
        )
    Wt, _ = _to_tensor(W, "rel")
    _check_float(Wt, "rel")
    if tuple(Wt.shape) != (L, d, d):
        raise InputError(
            f"rel (W) has shape {tuple(Wt.shape)} but expected ({L}, {d}, {d}) = "
            f"(q_offset+n+m-1, d, d) for n={n}, m={m}, q_offset={ops.q_offset}, d={d}"
        )
    check_finite(Wt, "rel")
    ops.rel = Wt.to(device=ops.q.device, dtype=ops.q.dtype)
    slope = ops.options["alibi_slope"]
    if slope is not None and (not isinstance(slope, (int, float)) or not math.isfinite(slope) or slope < 0):
        raise InputError(f"alibi_slope={slope!r} must be a finite number >= 0 (bias -slope*|i-j|)")


def relative_offsets(ops: Operands, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Index into W for each (query, key) pair: i - j + m - 1 (positions include q_offset)."""
    return q_pos[:, None] - k_pos[None, :] + (ops.ms[0] - 1)

