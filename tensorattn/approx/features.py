"""Symmetric tensor-power feature maps built from index tables (docs/design.md#the-polynomial-method).

A score s = sum_I prod_m x_m[I] over D index tuples has s^t = sum_{|alpha|=t} (t!/alpha!) prod_m
x_m^alpha, where alpha runs over multisets of size t of the D coordinates. Each operand therefore
gets the feature vector phi(x)_alpha = x^alpha for all multisets of size <= g, rank
r = C(D+g, g). Degree-t monomials are built from degree-(t-1) ones as parent x one coordinate
(the coordinate is >= the parent's largest one, so each multiset appears once). The index tables
order monomials so that the parents of one coordinate form a contiguous prefix: each degree is D
broadcast multiplies of contiguous blocks, with no gather and no Python loop over monomials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class MonomialTables:
    """Index tables for monomials of degree <= g in D variables.

    Degree-t monomials are ordered by their largest coordinate c, then by parent; the degree-(t-1)
    list is ordered the same way, so the parents of the block with largest coordinate c are a
    *prefix* of the previous degree (those whose largest coordinate is <= c). ``parents[t]`` /
    ``coords[t]`` spell out (parent, coordinate) per monomial; ``prefix[t][c]`` is that prefix
    length, which lets the feature map multiply contiguous blocks without a gather.
    ``degree`` and ``multinomial`` (t!/alpha!, exact integers, stored as float64) are per monomial.
    """

    D: int
    g: int
    parents: tuple[np.ndarray, ...]
    coords: tuple[np.ndarray, ...]
    prefix: tuple[tuple[int, ...], ...]
    degree: np.ndarray
    multinomial: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.degree.shape[0])


def rank_for(D: int, g: int) -> int:
    """r = C(D+g, g), the number of monomials of degree <= g in D variables."""
    return math.comb(D + g, g)


@lru_cache(maxsize=64)
def monomial_tables(D: int, g: int) -> MonomialTables:
    parents: list[np.ndarray] = [np.zeros(0, np.int64)]
    coords: list[np.ndarray] = [np.zeros(0, np.int64)]
    prefixes: list[tuple[int, ...]] = [()]
    last = np.full(1, -1, np.int64)  # largest coordinate of each degree-(t-1) monomial (-1: none)
    run = np.zeros(1, np.int64)  # multiplicity of that coordinate
    weight = np.ones(1, dtype=object)  # exact (t-1)!/alpha!
    degrees = [np.zeros(1, np.int64)]
    weights = [weight]
    for t in range(1, g + 1):
        # parents with largest coordinate <= c form a prefix because `last` is sorted
        counts = np.searchsorted(last, np.arange(D), side="right")
        parent = np.concatenate([np.arange(cnt) for cnt in counts]) if D else np.zeros(0, np.int64)
        coord = np.repeat(np.arange(D), counts)
        new_run = np.where(coord == last[parent], run[parent] + 1, 1)
        # t!/alpha'! = (t-1)!/alpha! * t / alpha'_c, exact in Python integers
        new_weight = (weight[parent] * t) // new_run.astype(object)
        parents.append(parent)
        coords.append(coord)
        prefixes.append(tuple(int(c) for c in counts))
        degrees.append(np.full(parent.shape[0], t, np.int64))
        weights.append(new_weight)
        last, run, weight = coord, new_run, new_weight
    multinomial = np.concatenate(weights).astype(np.float64)
    return MonomialTables(D, g, tuple(parents), tuple(coords), tuple(prefixes), np.concatenate(degrees), multinomial)


#: below this many feature elements (all batch rows together) the map is built by g row gathers from [1, x]
#: (g + g - 1 ops) instead of D * g block multiplies: at small N the per-op cost dominates
GATHER_ELEMS = 1 << 18


@lru_cache(maxsize=64)
def factor_table(D: int, g: int, device: torch.device) -> torch.Tensor:
    """(g, r): the rows of [1, x] whose product is each monomial (0, the row of ones, pads a
    monomial of degree < g), in the order of ``monomial_tables``."""
    tab = monomial_tables(D, g)
    coords = [np.zeros((1, 0), np.int64)]
    for t in range(1, g + 1):
        coords.append(np.concatenate([coords[-1][tab.parents[t]], tab.coords[t][:, None] + 1], axis=1))
    idx = np.zeros((tab.rank, g), np.int64)
    row = 0
    for t, c in enumerate(coords):
        idx[row: row + c.shape[0], :t] = c
        row += c.shape[0]
    with torch.inference_mode(False):  # cached: a normal tensor serves calls in any mode
        return torch.as_tensor(idx.T.copy(), device=device)


def _gathered(xt: torch.Tensor, g: int) -> torch.Tensor:
    """feature_map_t for small inputs: rows of [1, x] gathered and multiplied, g factors at a time."""
    idx = factor_table(xt.shape[-2], g, xt.device)
    lead, N = xt.shape[:-2], xt.shape[-1]
    xa = torch.cat([xt.new_ones(*lead, 1, N), xt], dim=-2)
    return _gather_products(xa, idx, xt.new_empty(*lead, idx.shape[1], N))


def _gather_products(xa: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                     tmp: torch.Tensor | None = None) -> torch.Tensor:
    """out = prod_j xa[..., idx[j], :] (rows of [1; x] along dim -2), the factors multiplied in
    order; ``tmp`` (out's shape) takes each gathered factor when given."""
    dim = xa.dim() - 2
    torch.index_select(xa, dim, idx[0], out=out)
    for row in idx[1:]:
        out.mul_(torch.index_select(xa, dim, row, out=tmp) if tmp is not None else xa.index_select(dim, row))
    return out


def feature_map_t(xt: torch.Tensor, g: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """phi for tokens laid out last: xt of shape (..., D, N) -> (..., C(D+g, g), N).

    Each degree is built from the previous one block by block: the monomials whose largest
    coordinate is c are (prefix of the previous degree) * x_c, a contiguous broadcast multiply.
    Without autograd the blocks are written into one preallocated buffer (``out``, of shape
    (..., C(D+g, g), N), when the caller reuses one); with autograd they are concatenated (in-place
    writes would invalidate saved tensors) and ``out`` is not used.
    """
    D, N = xt.shape[-2], xt.shape[-1]
    tab = monomial_tables(D, g)
    lead = xt.shape[:-2]
    if torch.is_grad_enabled() and xt.requires_grad:
        levels = [torch.ones(*lead, 1, N, dtype=xt.dtype, device=xt.device)]
        for t in range(1, g + 1):
            prev = levels[-1]
            levels.append(torch.cat([prev[..., :cnt, :] * xt[..., c: c + 1, :]
                                     for c, cnt in enumerate(tab.prefix[t])], dim=-2))
        return torch.cat(levels, dim=-2)
    if g >= 1 and math.prod(lead) * tab.rank * N <= GATHER_ELEMS:
        return _gathered(xt, g)
    if out is None or out.shape != (*lead, tab.rank, N) or out.dtype != xt.dtype or out.device != xt.device:
        out = xt.new_empty(*lead, tab.rank, N)
    out.select(-2, 0).fill_(1)
    for a, b, o in _block_products(xt, out, g):
        torch.mul(a, b, out=o)
    return out


def _block_products(xt: torch.Tensor, out: torch.Tensor, g: int) -> list[tuple[torch.Tensor, ...]]:
    """(a, b, o) views with o = a * b, in order, building degrees 1..g of ``feature_map_t`` in ``out``
    (row 0 of ``out`` holds the ones): block c of degree t is (prefix of degree t-1) * x_c."""
    tab = monomial_tables(xt.shape[-2], g)
    rows = xt.split(1, dim=-2)
    steps = []
    lo, hi = 0, 1  # rows of the previous degree
    for t in range(1, g + 1):
        width = sum(tab.prefix[t])  # the monomials of degree t
        prev = out.narrow(-2, lo, hi - lo)
        blocks = out.narrow(-2, hi, width).split(tab.prefix[t], dim=-2)
        steps.extend((prev.narrow(-2, 0, cnt), rows[c], blocks[c]) for c, cnt in enumerate(tab.prefix[t]))
        lo, hi = hi, hi + width
    return steps


#: per-op cost of a small torch op in element multiplies (about 1.7 us against 0.16 ns per element
#: on the dev box): ``FeatureProgram`` weighs D * g block multiplies against g row gathers with it
OP_ELEMS = 10_000


class FeatureProgram:
    """``feature_map`` into one fixed tokens-last buffer ``out`` (..., C(D+g, g), N), with every view
    and index made once. A caller that fills the same buffer chunk after chunk (the factorized
    engine) keeps the program with the buffer: each call is then a copy of x and a few ops, without
    the Python cost of cutting views again (at cache-sized chunks that took as long as the
    multiplies). Two ways to build the monomials, the cheaper by the op-count model (``OP_ELEMS``):
    the D * g block multiplies of ``feature_map_t``, or g row gathers from a private [1; x] buffer
    multiplied together (fewer ops, more work per element: small chunks, large D). Both multiply
    each monomial's factors in the same order: the result is the same, bit for bit, as
    ``feature_map(x, g, out)``."""

    def __init__(self, out: torch.Tensor, D: int, g: int):
        self.out = out
        elems = out.numel()
        self.gathered = g >= 2 and 2 * g * OP_ELEMS + 1.25 * g * elems < D * g * OP_ELEMS + elems
        lead, N = out.shape[:-2], out.shape[-1]
        if self.gathered:
            self.xa = out.new_empty(*lead, D + 1, N)
            self.xa.select(-2, 0).fill_(1)  # private: the row of ones stays
            self.xt = self.xa.narrow(-2, 1, D)
            self.idx = factor_table(D, g, out.device)
            self.tmp = torch.empty_like(out)
        else:
            self.xt = out.new_empty(*lead, D, N)
            self.ones = out.select(-2, 0)
            self.steps = _block_products(self.xt, out, g)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) for x of shape (..., N, D), as a (..., N, C(D+g, g)) view of the buffer."""
        self.xt.copy_(x.transpose(-1, -2))
        if self.gathered:
            _gather_products(self.xa, self.idx, self.out, self.tmp)
        else:
            self.ones.fill_(1)  # the buffer is shared: another program may have written this row
            mul = torch.mul
            for a, b, o in self.steps:
                mul(a, b, out=o)
        return self.out.transpose(-1, -2)


def feature_map(x: torch.Tensor, g: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) for x of shape (..., N, D): all monomials of degree <= g, shape (..., N, C(D+g, g)).

    The result is a transposed view of a tokens-last buffer, so ``phi.transpose(-1, -2)`` is
    contiguous for the key-side GEMM U^T [v | 1]. The tokens-last copy of x is contiguous, so each
    block multiply streams over unit-stride rows (about 2x faster than a strided view). ``out``: a
    tokens-last buffer (..., C(D+g, g), N) to write into, as in ``feature_map_t``."""
    return feature_map_t(x.transpose(-1, -2).contiguous(), g, out).transpose(-1, -2)


def polynomial_features(g: int):
    """phi of degree g as a feature callable of the factorized engine, which may pass ``out`` (a
    tokens-last buffer) to reuse one buffer chunk after chunk."""
    def phi(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return feature_map(x, g, out)

    phi.writes_into = True
    phi.program = lambda out, D: FeatureProgram(out, D, g)  # the same map into one fixed buffer
    phi.program_key = ("polynomial", g)
    return phi


def query_weights(coeffs: np.ndarray, scale: float, D: int, g: int) -> np.ndarray:
    """Per-monomial weight c_t * scale^t * t!/alpha!, all on the query side."""
    tab = monomial_tables(D, g)
    ct = np.asarray(coeffs, np.float64) * float(scale) ** np.arange(g + 1)
    return ct[tab.degree] * tab.multinomial


def augment(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: one GEMM gives the numerator statistics and the normalizer."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
