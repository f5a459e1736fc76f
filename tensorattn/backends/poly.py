"""Polynomial-method backend for every separable spec (DESIGN 5.1).

exp(s) is replaced by the certified polynomial P(s) = sum_t c_t s^t chosen by the plan. With
phi the symmetric tensor-power feature map of each slot's expanded D-vector and all coefficients on
the query side, P(s_{i j_1 .. j_{k-1}}) = sum_r U_q[i, r] prod_m U_m[j_m, r]. Summing over the key
tuples factorizes:

    out_i = U_q[i] . combine_m(U_m^T [v_m | 1])     (the combine is the value einsum, entrywise in r)

so the cost is O((n + sum m) r e) instead of O(n prod m d). Causal attention replaces each
U_m^T [v_m | 1] by its prefix sum over positions, chunked so memory stays O(chunk r e).
"""

from __future__ import annotations

import math
import string

import torch

from ..approx.features import feature_map, query_weights
from ..approx.polynomials import get_approximant
from ..inputs import Operands
from .base import Backend
from .exact import contract

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def expand_operand(t: torch.Tensor, feats: str, contracted: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """(Z, N, *feats) -> (Z, N, D): the operand's value at every contracted index tuple I."""
    Z, N = t.shape[:2]
    perm = [feats.index(c) for c in contracted if c in feats]
    t = t.permute(0, 1, *(2 + p for p in perm))
    shape = [Z, N] + [sizes[c] if c in feats else 1 for c in contracted]
    full = [Z, N] + [sizes[c] for c in contracted]
    return t.reshape(shape).expand(full).reshape(Z, N, math.prod(full[2:]))


class PolyBackend(Backend):
    """Certified polynomial-method attention for separable specs (pairwise, triple, order-k, rope,
    custom einsum specs), causal or not."""

    name = "poly"
    certified = True

    def __init__(self) -> None:
        self.relative_impl = None  # set by the relative-position FFT module when registered

    @property
    def supports_relative(self) -> bool:
        return self.relative_impl is not None

    def run(self, plan, ops: Operands) -> torch.Tensor:
        if not ops.spec.separable:
            if self.relative_impl is None:  # pragma: no cover - the planner refuses earlier
                raise NotImplementedError("relative poly")
            return self.relative_impl(plan, ops)
        cert = plan.certificate
        g = cert.degree
        fdtype = _DTYPES[cert.feature_dtype]
        se, ve = ops.spec.score_einsum, ops.spec.value_einsum
        approx = get_approximant(plan.approximant)
        D = ops.D
        coeffs = approx.coefficients(float(plan.beta), g)
        w = torch.as_tensor(query_weights(coeffs, ops.scale, D, g), dtype=fdtype, device=ops.q.device)
        xs = [expand_operand(t.to(fdtype), f, se.contracted, ops.sizes) for t, f in zip([ops.q, *ops.keys], se.features)]
        Z = ops.q.shape[0]
        vflat = [v.to(fdtype).reshape(Z, v.shape[1], -1) for v in ops.values]
        value_shapes = [tuple(v.shape[2:]) for v in ops.values]
        rletter = next(c for c in string.ascii_letters if c not in ve.expr)
        combine_expr = (
            ",".join("..." + rletter + letters for letters in ve.value_letters)
            + "->..." + rletter + ve.out_letters
        )
        budget = int(ops.options.get("memory_budget", 64 << 20)) // torch.finfo(fdtype).bits * 8
        r = cert.rank
        E = math.prod(ops.out_value_shape)
        if ops.causal:
            out = self._causal(ops, xs, vflat, value_shapes, w, g, r, E, combine_expr, budget)
        else:
            out = self._full(ops, xs, vflat, value_shapes, w, g, r, combine_expr, budget)
        return out.reshape(Z, ops.n, *ops.out_value_shape).to(ops.dtype)

    @staticmethod
    def _augment(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

    def _combine(self, states, value_shapes, combine_expr):
        """Value einsum on numerators (entrywise in r), product of normalizers: (..., r, E + 1)."""
        lead = states[0].shape[:-1]
        nums = [s[..., :-1].reshape(*lead, *vs) for s, vs in zip(states, value_shapes)]
        num = contract(combine_expr, *nums).reshape(*lead, -1)
        den = states[0][..., -1:]
        for s in states[1:]:
            den = den * s[..., -1:]
        return torch.cat([num, den], dim=-1)

    def _full(self, ops, xs, vflat, value_shapes, w, g, r, combine_expr, budget):
        Z = xs[0].shape[0]
        chunk = max(1, budget // (Z * r * 2))
        states = []
        for x, v in zip(xs[1:], vflat):
            state = x.new_zeros(Z, r, v.shape[-1] + 1)
            for j0 in range(0, x.shape[1], chunk):
                U = feature_map(x[:, j0: j0 + chunk], g)
                state = state + U.transpose(1, 2) @ self._augment(v[:, j0: j0 + chunk])
            states.append(state)
        combined = self._combine(states, value_shapes, combine_expr)  # (Z, r, E+1)
        outs = []
        for i0 in range(0, ops.n, chunk):
            Uq = feature_map(xs[0][:, i0: i0 + chunk], g) * w
            res = Uq @ combined
            outs.append(res[..., :-1] / res[..., -1:])
        return torch.cat(outs, dim=1)

    def _causal(self, ops, xs, vflat, value_shapes, w, g, r, E, combine_expr, budget):
        """Prefix states: key j is visible to query i iff j <= i + q_offset (for every slot)."""
        Z = xs[0].shape[0]
        o = ops.q_offset
        nk = len(xs) - 1
        width = sum(v.shape[-1] + 1 for v in vflat) + E + 1
        chunk = max(1, budget // (Z * r * (2 * width + 1)))
        states, kcur = [], []
        for x, v in zip(xs[1:], vflat):  # keys before the first query are visible to all queries
            state = x.new_zeros(Z, r, v.shape[-1] + 1)
            upto = min(o, x.shape[1])
            for j0 in range(0, upto, chunk):
                j1 = min(upto, j0 + chunk)
                state = state + feature_map(x[:, j0:j1], g).transpose(1, 2) @ self._augment(v[:, j0:j1])
            states.append(state)
            kcur.append(upto)
        outs = []
        for i0 in range(0, ops.n, chunk):
            i1 = min(ops.n, i0 + chunk)
            per_query = []
            for s in range(nk):
                x, v, m = xs[1 + s], vflat[s], xs[1 + s].shape[1]
                kend = min(i1 + o, m)
                a = kcur[s]
                if kend > a:
                    U = feature_map(x[:, a:kend], g)  # (Z, L, r)
                    outer = U[..., :, None] * self._augment(v[:, a:kend])[..., None, :]
                    prefix = torch.cumsum(outer, dim=1) + states[s][:, None]
                    full = torch.cat([states[s][:, None], prefix], dim=1)  # (Z, L+1, r, e+1)
                else:
                    full = states[s][:, None]
                pos = torch.arange(i0, i1, device=x.device)
                count = (pos + o + 1 - a).clamp(0, full.shape[1] - 1)
                per_query.append(full[:, count])  # (Z, bq, r, e+1)
                states[s] = full[:, -1]
                kcur[s] = max(a, kend)
            combined = self._combine(per_query, value_shapes, combine_expr)  # (Z, bq, r, E+1)
            Uq = feature_map(xs[0][:, i0:i1], g) * w
            res = torch.einsum("zir,zirc->zic", Uq, combined)
            outs.append(res[..., :-1] / res[..., -1:])
        return torch.cat(outs, dim=1)
