"""Entry bounds from inputs: beta (score radius, decides the degree), B (the papers' entry bound,
decides the verdict), tau_k(n) (the order-k threshold) and vmax; and the ``Problem`` of a call
(docs/design.md, "The bound check")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import Operands, max_abs, term_operands
from ..request import Problem, Request, TermStats
from .relative import max_spectral_norm, relative_support


def threshold(order: int, n: int) -> float:
    """tau_k(n) = (ln n)^(1/k): Alman & Song's threshold for order-k attention."""
    return math.log(n) ** (1.0 / order) if n > 1 else 0.0


@dataclass(frozen=True)
class InputStats:
    beta: float  # rigorous bound on |score| over every (query, key tuple)
    B: float  # (|scale| D max|q| prod max|k_m|)^(1/k); for a polynomial, that of the deciding term
    vmax: float  # bound on |combined value| for one key tuple
    n_max: int
    terms: tuple[TermStats, ...] = ()
    linf: tuple[float, ...] = ()  # max |entry| of each slot's array (query first)
    value_linf: tuple[float, ...] = ()  # max |entry| of each value operand


def _missing_factor(feats: str, contracted: tuple[str, ...], sizes: dict[str, int]) -> float:
    """sqrt of the number of times each entry repeats when the operand is expanded to all D tuples."""
    return math.sqrt(math.prod(sizes[c] for c in contracted if c not in feats))


@dataclass(frozen=True)
class OperandMaxima:
    """Per-operand maxima that the bounds are built from. Each is a max over tokens, so shards of
    a sequence combine by an elementwise max (the distributed frontend all-reduces ``flat()``).

    ``l2`` and ``linf`` run over the operands of every term in order (for a single-term spec, one
    per slot, query first); an operand is the slot's array, or its block for that term."""

    l2: tuple[float, ...]  # max l2 norm of each expanded score operand
    linf: tuple[float, ...]  # max |entry| of each score operand
    vals: tuple[float, ...]  # max |entry| of each value operand
    wnorm: float  # max spectral norm of the relative matrices W (1.0 without)

    def flat(self) -> list[float]:
        return [*self.l2, *self.linf, *self.vals, self.wnorm]

    @classmethod
    def from_flat(cls, xs, operands: int) -> "OperandMaxima":
        """Inverse of ``flat`` for a spec with ``operands`` term operands (its order, for one term)."""
        xs = [float(x) for x in xs]
        return cls(tuple(xs[:operands]), tuple(xs[operands: 2 * operands]), tuple(xs[2 * operands: -1]), xs[-1])


def _max_row_norm(flat: torch.Tensor, top: float) -> float:
    """max l2 norm over the rows of ``flat`` (max |entry| ``top``). Far from 1 the squares would
    overflow or underflow (an inf or a too small beta), so the rows are scaled by a power of two first."""
    if top == 0.0 or 2.0 ** -60 <= top <= 2.0 ** 60:
        return float(torch.linalg.vector_norm(flat, dim=-1).amax())
    step = 2.0 ** math.floor(math.log2(top))
    return float(torch.linalg.vector_norm(flat / step, dim=-1).amax()) * step


def _top(ops: Operands, t: torch.Tensor) -> float:
    """max |entry| of ``t``: the one ``prepare`` measured on this very array, else one pass."""
    known = ops.known_max(t)
    return max_abs([t])[0] if known is None else known


def operand_maxima(ops: Operands) -> OperandMaxima:
    """The maxima of every operand; each reduction reads a detached view, so none enters a graph."""
    spec = ops.spec
    arrays = [ops.q, *ops.keys]
    Z = ops.q.shape[0]
    l2 = []
    linf = []
    for term in spec.terms:
        for t, feats in zip(term_operands(spec, ops.sizes, arrays, term), term.einsum.features):
            if t.numel() == 0:
                l2.append(0.0)
                linf.append(0.0)
                continue
            flat = t.detach().reshape(Z, t.shape[1], -1)
            top = _top(ops, t)
            l2.append(_max_row_norm(flat, top) * _missing_factor(feats, term.contracted, ops.sizes))
            linf.append(top)
    wnorm = 1.0
    if ops.rel is not None and ops.rel.numel():
        wnorm = max_spectral_norm(ops.rel)
    vals = [_top(ops, v) for v in ops.values]
    return OperandMaxima(tuple(l2), tuple(linf), tuple(vals), wnorm)


def term_stats(spec, scale: float, sizes: dict[str, int], maxima: OperandMaxima) -> tuple[TermStats, ...]:
    """beta_t (score radius) and B_t (entry bound) of every term, from the operand maxima.

    Hoelder on the expanded D_t-vectors: |term| <= |c_t| scale ||x_0||_2 ||x_1||_2 prod_{m>=2} ||x_m||_inf
    (one operand: ||x_0||_1 <= sqrt(D_t) ||x_0||_2); B_t = (|c_t| scale D_t prod max|x_m|)^(1/k_t)."""
    out, first = [], 0
    for term in spec.terms:
        k = term.order
        l2 = maxima.l2[first: first + k]
        linf = maxima.linf[first: first + k]
        first += k
        D = math.prod(sizes[c] for c in term.contracted)
        c = abs(term.coefficient) * abs(scale)
        beta = c * (l2[0] * l2[1] * math.prod(linf[2:]) if k >= 2 else l2[0] * math.sqrt(D))
        B = (c * D * math.prod(linf)) ** (1.0 / k)
        out.append(TermStats(beta=beta, B=B, order=k, D=D))
    return tuple(out)


def input_stats(ops: Operands, maxima: OperandMaxima | None = None) -> InputStats:
    """beta, B and vmax of ``ops``; ``maxima`` overrides the measured ones (e.g. global maxima)."""
    spec = ops.spec
    scale = abs(ops.scale)
    mx = operand_maxima(ops) if maxima is None else maxima
    ve = spec.value_einsum
    vmax = math.prod(mx.vals) * math.prod(ops.value_sizes[c] for c in ve.summed)
    n_max = max(ops.n, *ops.ms)
    if spec.is_polynomial:
        terms = term_stats(spec, scale, ops.sizes, mx)
        deciding = max(terms, key=lambda t: t.B / threshold(t.order, n_max) if n_max > 1 else t.B)
        slot_linf = [0.0] * spec.order  # max |entry| of each slot: the max over its term operands
        for slot, top in zip((s for term in spec.terms for s in term.slots), mx.linf):
            slot_linf[slot] = max(slot_linf[slot], top)
        return InputStats(beta=sum(t.beta for t in terms), B=deciding.B, vmax=vmax, n_max=n_max, terms=terms,
                          linf=tuple(slot_linf), value_linf=tuple(mx.vals))
    l2, linf, wnorm = mx.l2, mx.linf, mx.wnorm
    # Hoelder: |s| <= scale ||x_0||_2 ||x_1||_2 prod_{m>=2} ||x_m||_inf on expanded D-vectors
    beta = scale * l2[0] * l2[1] * math.prod(linf[2:]) * wnorm
    prod_entries = linf[0] * math.prod(linf[1:])
    if ops.rel is not None:
        prod_entries *= wnorm
    B = (scale * ops.D * prod_entries) ** (1.0 / spec.order)
    return InputStats(beta=beta, B=B, vmax=vmax, n_max=n_max, linf=tuple(linf), value_linf=tuple(mx.vals))


def problem_for(ops: Operands, request: Request, *, maxima: OperandMaxima | None = None, n: int | None = None,
                ms: tuple[int, ...] | None = None) -> Problem:
    """The Problem of a call on ``ops``. A sequence-parallel caller passes the global ``maxima``,
    ``n`` and ``ms``, so that every shard plans the whole sequence and picks the same degree."""
    mx = operand_maxima(ops) if maxima is None else maxima
    stats = input_stats(ops, mx)
    support = None
    if ops.rel is not None:  # max ||W_t|| is in the maxima already (the same float64 SVD; every shard has all of W)
        support = relative_support(ops.rel, ops.D, wnorm=mx.wnorm)
    need_grad = request.need_grad if request.need_grad is not None else ops.tracks_grad
    return Problem(
        spec=ops.spec, n=ops.n if n is None else n, ms=ops.ms if ms is None else ms, D=ops.D,
        value_dims=tuple(math.prod(v.shape[2:]) for v in ops.values), E=math.prod(ops.out_value_shape),
        beta=stats.beta, B=stats.B, scale=ops.scale, Z=ops.q.shape[0], causal=ops.causal, vmax=stats.vmax,
        dtype="float64" if ops.dtype == torch.float64 else "float32", need_grad=need_grad,
        q_offset=ops.q_offset, relative=support,
        alibi_slope=ops.alibi_slope, terms=stats.terms, value_shapes=tuple(tuple(v.shape[2:]) for v in ops.values),
        key_mask=ops.key_mask, attn_mask=ops.attn_mask is not None, out_dtype=ops.out_dtype_name,
        linf=tuple(stats.linf), value_linf=tuple(stats.value_linf),
    )
