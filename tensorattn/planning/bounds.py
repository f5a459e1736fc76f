"""Entry bounds from inputs: beta (score radius, decides the degree), B (the papers' entry bound,
decides the verdict), tau_k(n) (the order-k threshold) and vmax; and the ``Problem`` of a call
(docs/design.md, "The bound check")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import Operands
from ..request import Problem, Request
from .relative import relative_support


def threshold(order: int, n: int) -> float:
    """tau_k(n) = (ln n)^(1/k): Alman & Song's threshold for order-k attention."""
    return math.log(n) ** (1.0 / order) if n > 1 else 0.0


@dataclass(frozen=True)
class InputStats:
    beta: float  # rigorous bound on |s| over every (query, key tuple)
    B: float  # (|scale| D max|q| prod max|k_m|)^(1/k)
    vmax: float  # bound on |combined value| for one key tuple
    n_max: int
    linf: tuple[float, ...] = ()  # max |entry| of each score operand (query first)
    value_linf: tuple[float, ...] = ()  # max |entry| of each value operand


def _missing_factor(feats: str, contracted: tuple[str, ...], sizes: dict[str, int]) -> float:
    """sqrt of the number of times each entry repeats when the operand is expanded to all D tuples."""
    return math.sqrt(math.prod(sizes[c] for c in contracted if c not in feats))


@dataclass(frozen=True)
class OperandMaxima:
    """Per-operand maxima that the bounds are built from. Each is a max over tokens, so shards of
    a sequence combine by an elementwise max (the distributed frontend all-reduces ``flat()``)."""

    l2: tuple[float, ...]  # max l2 norm of each expanded score operand (query first)
    linf: tuple[float, ...]  # max |entry| of each score operand
    vals: tuple[float, ...]  # max |entry| of each value operand
    wnorm: float  # max spectral norm of the relative matrices W (1.0 without)

    def flat(self) -> list[float]:
        return [*self.l2, *self.linf, *self.vals, self.wnorm]

    @classmethod
    def from_flat(cls, xs, order: int) -> "OperandMaxima":
        xs = [float(x) for x in xs]
        return cls(tuple(xs[:order]), tuple(xs[order: 2 * order]), tuple(xs[2 * order: 3 * order - 1]), xs[-1])


def _max_row_norm(flat: torch.Tensor, top: float) -> float:
    """max l2 norm over the rows of ``flat`` (max |entry| ``top``). Far from 1 the squares would
    overflow or underflow (an inf or a too small beta), so the rows are scaled by a power of two first."""
    if top == 0.0 or 2.0 ** -60 <= top <= 2.0 ** 60:
        return float(flat.norm(dim=-1).max())
    step = 2.0 ** math.floor(math.log2(top))
    return float((flat / step).norm(dim=-1).max()) * step


def operand_maxima(ops: Operands) -> OperandMaxima:
    se = ops.spec.score_einsum
    operands = [ops.q, *ops.keys]
    with torch.no_grad():
        Z = ops.q.shape[0]
        l2 = []
        linf = []
        for t, feats in zip(operands, se.features):
            if t.numel() == 0:
                l2.append(0.0)
                linf.append(0.0)
                continue
            flat = t.detach().reshape(Z, t.shape[1], -1)
            top = float(flat.abs().max())
            l2.append(_max_row_norm(flat, top) * _missing_factor(feats, se.contracted, ops.sizes))
            linf.append(top)
        wnorm = 1.0
        if ops.rel is not None and ops.rel.numel():
            wnorm = float(torch.linalg.matrix_norm(ops.rel.detach(), ord=2).max())
        vals = [float(v.detach().abs().max()) if v.numel() else 0.0 for v in ops.values]
    return OperandMaxima(tuple(l2), tuple(linf), tuple(vals), wnorm)


def input_stats(ops: Operands, maxima: OperandMaxima | None = None) -> InputStats:
    """beta, B and vmax of ``ops``; ``maxima`` overrides the measured ones (e.g. global maxima)."""
    spec = ops.spec
    scale = abs(ops.scale)
    mx = operand_maxima(ops) if maxima is None else maxima
    l2, linf, vals, wnorm = mx.l2, mx.linf, mx.vals, mx.wnorm
    # Hoelder: |s| <= scale ||x_0||_2 ||x_1||_2 prod_{m>=2} ||x_m||_inf on expanded D-vectors
    beta = scale * l2[0] * l2[1] * math.prod(linf[2:]) * wnorm
    D = ops.D
    prod_entries = linf[0] * math.prod(linf[1:])
    if ops.rel is not None:
        prod_entries *= wnorm
    B = (scale * D * prod_entries) ** (1.0 / spec.order)
    ve = spec.value_einsum
    vmax = math.prod(vals) * math.prod(ops.value_sizes[c] for c in ve.summed)
    return InputStats(beta=beta, B=B, vmax=vmax, n_max=max(ops.n, *ops.ms), linf=tuple(linf), value_linf=tuple(vals))


def problem_for(ops: Operands, request: Request, *, maxima: OperandMaxima | None = None, n: int | None = None,
                ms: tuple[int, ...] | None = None) -> Problem:
    """The Problem of a call on ``ops``. A sequence-parallel caller passes the global ``maxima``,
    ``n`` and ``ms``, so that every shard plans the whole sequence and picks the same degree."""
    stats = input_stats(ops, maxima)
    need_grad = request.need_grad if request.need_grad is not None else ops.tracks_grad
    return Problem(
        spec=ops.spec, n=ops.n if n is None else n, ms=ops.ms if ms is None else ms, D=ops.D,
        value_dims=tuple(math.prod(v.shape[2:]) for v in ops.values), E=math.prod(ops.out_value_shape),
        beta=stats.beta, B=stats.B, scale=ops.scale, Z=ops.q.shape[0], causal=ops.causal, vmax=stats.vmax,
        dtype="float64" if ops.dtype == torch.float64 else "float32", need_grad=need_grad,
        q_offset=ops.q_offset, relative=relative_support(ops.rel, ops.D) if ops.rel is not None else None,
        alibi_slope=ops.alibi_slope, out_dtype=ops.out_dtype_name, linf=tuple(stats.linf),
        value_linf=tuple(stats.value_linf),
    )
