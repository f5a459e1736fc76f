"""Well-known baselines, registered as backends so any spec can name them and the benchmark suite
can compare them with exact and poly at equal rank. None of them carries a certificate
(``info.error_bound`` is None).

- ``sdpa``: torch's ``scaled_dot_product_attention``, chunked over queries so the score block stays
  within ``memory_budget``. Exact softmax; order-2 separable specs (pairwise, rope, custom order-2).
- ``favor``: Performer FAVOR+ positive orthogonal random features (Choromanski et al., *Rethinking
  Attention with Performers*, ICLR 2021, Lemma 1 and Sec. 2.4). Order-2 separable specs.
- ``taylor2``: the degree-2 Taylor kernel 1 + s + s^2/2 of linear-attention models (Zhang et al.,
  *The Hedgehog & the Porcupine*; Arora et al., *Based*), feature map [1, x, x (x) x / sqrt 2]
  written on symmetric monomials. Any separable spec.

favor and taylor2 reuse the factorized engine of the poly backend with their own feature maps.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..approx.features import feature_map, query_weights, rank_for
from ..errors import InputError
from ..inputs import Operands, lasting
from ..masks import factorized_refusal
from ..registry import Backend, Refusal
from .poly import FactorizedAttention, expand_operand
from .poly_causal import polynomial_score_kernel

#: the degree-2 Taylor coefficients of exp: 1 + s + s^2 / 2
TAYLOR2_COEFFS = np.array([1.0, 1.0, 0.5])


def _expanded(ops: Operands, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of an order-2 separable spec as (Z, N, D) vectors: s = scale <q, k>."""
    se = ops.spec.score_einsum
    q = expand_operand(ops.q.to(dtype), se.features[0], se.contracted, ops.sizes)
    k = expand_operand(ops.keys[0].to(dtype), se.features[1], se.contracted, ops.sizes)
    return q, k


def finite_or_refuse(out: torch.Tensor, plan, what: str) -> torch.Tensor:
    """``out`` when finite; else an InputError: a baseline without a certificate must not return NaN."""
    if not bool(torch.isfinite(out).all()):
        raise InputError(
            f"backend={plan.backend!r} produced non-finite outputs: {what} under/overflowed in {out.dtype} at "
            f"these inputs (score radius beta = {plan.beta:.4g}). Fix: use float64 inputs, a smaller scale, or "
            "backend='exact'/'poly'"
        )
    return out


def _order2_refusal(spec) -> Refusal | None:
    if not spec.separable:
        return Refusal("its score depends on i - j through W, so it is not a dot product of per-token vectors")
    if spec.order != 2:
        return Refusal(f"it computes pairwise softmax(q k^T) only, and this spec has {spec.order - 1} key slots")
    return None


class SDPABackend(Backend):
    """torch ``scaled_dot_product_attention`` over query chunks (exact softmax, no certificate)."""

    name = "sdpa"

    def serves(self, spec, problem) -> bool | Refusal:
        refusal = _order2_refusal(spec)
        if refusal is not None:
            return refusal
        ve = spec.value_einsum
        if ve.summed or tuple(ve.value_letters[0]) != tuple(ve.out_letters):
            return Refusal(f"its value einsum {spec.value!r} is not out_i = sum_j p_ij v_j")
        return True

    def run(self, plan, ops: Operands) -> torch.Tensor:
        dtype = ops.dtype
        ops = ops.to(torch.float64 if plan.exact_dtype == "float64" else dtype)  # float32 could overflow
        q, k = _expanded(ops, ops.dtype)
        Z, n, m = q.shape[0], ops.n, ops.ms[0]
        v = ops.values[0].reshape(Z, m, -1)
        budget = plan.request.memory_budget
        # the score block (and, when causal, its mask) is the only n x m sized intermediate
        per_row = m * q.element_size() * (3 if ops.causal else 2)
        z_chunk = max(1, min(Z, budget // max(1, per_row * n)))
        i_chunk = max(1, min(n, budget // max(1, per_row * z_chunk)))
        keys = torch.arange(m, device=q.device)
        outs = []
        for z0 in range(0, Z, z_chunk):
            z1 = min(Z, z0 + z_chunk)
            rows = []
            for i0 in range(0, n, i_chunk):
                i1 = min(n, i0 + i_chunk)
                if ops.causal:  # key j is visible to query i iff j <= i + q_offset
                    kend = min(m, i1 + ops.q_offset)
                    pos = torch.arange(i0, i1, device=q.device) + ops.q_offset
                    mask = keys[None, :kend] <= pos[:, None]
                    rows.append(torch.nn.functional.scaled_dot_product_attention(
                        q[z0:z1, i0:i1], k[z0:z1, :kend], v[z0:z1, :kend], attn_mask=mask, scale=ops.scale))
                else:
                    rows.append(torch.nn.functional.scaled_dot_product_attention(
                        q[z0:z1, i0:i1], k[z0:z1], v[z0:z1], scale=ops.scale))
            outs.append(torch.cat(rows, dim=1))
        out = torch.cat(outs, dim=0)
        return out.reshape(Z, n, *ops.out_value_shape).to(dtype)


@lru_cache(maxsize=32)
def orthogonal_gaussian(rows: int, D: int, seed: int) -> torch.Tensor:
    """(rows, D) random matrix whose D-row blocks are orthogonal and whose rows have the norms of
    Gaussian vectors (Performer's "regular" orthogonal random features), float64, seeded. Cached:
    like a Performer layer, the features are drawn once per (rows, D, seed); outside inference mode,
    so that a later call that takes gradients can use them."""
    with lasting(), torch.no_grad():
        gen = torch.Generator().manual_seed(int(seed))
        g = torch.randn(math.ceil(rows / D), D, D, generator=gen, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed factor
        w = qmat.transpose(1, 2).reshape(-1, D)[:rows]
        norms = torch.randn(rows, D, generator=gen, dtype=torch.float64).norm(dim=1)
        return w * norms[:, None]


class FavorBackend(Backend):
    """Performer FAVOR+: exp(<x, y>) = E_w[phi(x) phi(y)] with phi(x) = exp(w.x - |x|^2/2)/sqrt(r),
    w orthogonal Gaussian (Choromanski et al. 2021, Lemma 1). Options: ``features`` (rank r,
    default 256) and ``seed`` (the random features are a deterministic function of it)."""

    name = "favor"
    applies_masks = True  # through the factorized engine; serves() refuses what it cannot apply

    def serves(self, spec, problem) -> bool | Refusal:
        refusal = _order2_refusal(spec)
        if refusal is None:  # a Refusal is falsy, so no `or` here
            refusal = factorized_refusal(problem)
        return True if refusal is None else refusal

    def run(self, plan, ops: Operands) -> torch.Tensor:
        rank, seed = plan.request.features, plan.request.seed
        dtype = ops.dtype
        D = ops.D
        if rank * D * 8 > plan.request.memory_budget:
            raise InputError(
                f"backend='favor' with features={rank:,} and D={D} needs a {rank:,} x {D} random matrix "
                f"({rank * D * 8:,} bytes), more than memory_budget={plan.request.memory_budget:,}. Fix: fewer "
                "features or a larger memory_budget"
            )
        w = orthogonal_gaussian(rank, D, seed).to(device=ops.q.device, dtype=dtype)
        # s = scale <q, k> = <x, y> with x = sqrt|scale| q, y = sign(scale) sqrt|scale| k
        root = math.sqrt(abs(ops.scale))
        sign = 1.0 if ops.scale >= 0 else -1.0
        _, k = _expanded(ops, dtype)
        # Performer's key stabilizer: one global constant (it cancels in the normalization) taken
        # over every key, so no key feature overflows; queries use a per-row constant.
        key_shift = self._key_shift(k * (sign * root), w, plan.request.memory_budget)

        def project(x: torch.Tensor) -> torch.Tensor:
            return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)

        def query_features(x: torch.Tensor) -> torch.Tensor:
            p = project(x * root)
            return torch.exp(p - p.amax(dim=-1, keepdim=True))

        def key_features(x: torch.Tensor) -> torch.Tensor:
            return torch.exp(project(x * (sign * root)) - key_shift)

        engine = FactorizedAttention.from_ops(ops, query_features, key_features, rank, dtype,
                                              plan.request.memory_budget)
        return finite_or_refuse(engine.run(), plan, "its random features exp(w.x - |x|^2/2)")

    @staticmethod
    def _key_shift(k: torch.Tensor, w: torch.Tensor, budget_bytes: int) -> torch.Tensor:
        budget = max(1, budget_bytes // (k.element_size() * w.shape[0] * 2))
        chunk = max(1, budget // max(1, k.shape[0]))
        shift = torch.tensor(float("-inf"), dtype=k.dtype, device=k.device)
        with torch.no_grad():
            for j0 in range(0, k.shape[1], chunk):
                x = k[:, j0: j0 + chunk]
                p = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
                shift = torch.maximum(shift, p.max())
        return shift


class Taylor2Backend(Backend):
    """Degree-2 Taylor kernel 1 + s + s^2/2 (always >= 1/2, so the normalizer never vanishes) with
    symmetric features of rank C(D+2, 2); the same function as [1, x, x (x) x / sqrt 2]."""

    name = "taylor2"
    applies_masks = True  # through the factorized engine; serves() refuses what it cannot apply

    def serves(self, spec, problem) -> bool | Refusal:
        if not spec.separable:
            return Refusal("its score depends on i - j through W, so it has no per-token feature map")
        refusal = factorized_refusal(problem)
        return True if refusal is None else refusal

    def run(self, plan, ops: Operands) -> torch.Tensor:
        dtype = ops.dtype
        ops = ops.to(torch.float64 if plan.exact_dtype == "float64" else dtype)  # float32 could overflow
        divisors = plan.unit_divisors
        scale = ops.scale * math.prod(divisors)
        w = torch.as_tensor(query_weights(TAYLOR2_COEFFS, scale, ops.D, 2), dtype=ops.dtype, device=ops.q.device)
        engine = FactorizedAttention.from_ops(
            ops,
            query_features=lambda x: feature_map(x, 2),
            key_features=lambda x: feature_map(x, 2),
            rank=rank_for(ops.D, 2),
            dtype=ops.dtype,
            budget_bytes=plan.request.memory_budget,
            query_weights=w,  # folded into the combined statistics, as poly does
            divisors=divisors,
        )
        engine.score_kernel = polynomial_score_kernel(TAYLOR2_COEFFS, scale)  # causal diagonal blocks
        return finite_or_refuse(engine.run(), plan, "its kernel 1 + s + s^2/2").to(dtype)


__all__ = ["FavorBackend", "SDPABackend", "Taylor2Backend", "orthogonal_gaussian"]
