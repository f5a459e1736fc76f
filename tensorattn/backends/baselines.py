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
from ..inputs import Operands
from .base import BACKENDS, Backend
from .poly import FactorizedAttention, expand_operand

#: FAVOR+ feature count when ``features=`` is not given (Performer's usual m for d = 64 heads)
DEFAULT_FAVOR_FEATURES = 256
#: the degree-2 Taylor coefficients of exp: 1 + s + s^2 / 2
TAYLOR2_COEFFS = np.array([1.0, 1.0, 0.5])


def backends_serving(ops: Operands) -> list[str]:
    """Names of the registered backends that can serve ``ops.spec`` (for error messages)."""
    names = []
    for name, impl in BACKENDS.items():
        if name == "poly" and not (ops.spec.separable or getattr(impl, "supports_relative", False)):
            continue
        if isinstance(impl, Baseline):
            if impl.why_not(ops) is None:
                names.append(name)
            continue
        try:
            impl.check(ops)
        except InputError:
            continue
        names.append(name)
    return names


def _refuse(backend: str, ops: Operands, why: str) -> InputError:
    others = ", ".join(repr(n) for n in backends_serving(ops))
    return InputError(
        f"backend={backend!r} cannot serve spec {ops.spec.name!r} (order {ops.order}, score "
        f"{ops.spec.score!r}{', positional=' + repr(ops.spec.positional) if ops.spec.positional else ''}): "
        f"{why}. Backends that can: {others}"
    )


def _expanded(ops: Operands, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of an order-2 separable spec as (Z, N, D) vectors: s = scale <q, k>."""
    se = ops.spec.score_einsum
    q = expand_operand(ops.q.to(dtype), se.features[0], se.contracted, ops.sizes)
    k = expand_operand(ops.keys[0].to(dtype), se.features[1], se.contracted, ops.sizes)
    return q, k


def _order2_reason(ops: Operands) -> str | None:
    if not ops.spec.separable:
        return "its score depends on i - j through W, so it is not a dot product of per-token vectors"
    if ops.order != 2:
        return f"it computes pairwise softmax(q k^T) only, and this spec has {ops.order - 1} key slots"
    return None


def _int_option(ops: Operands, name: str, default: int, minimum: int) -> int:
    value = ops.options.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


class Baseline(Backend):
    """A baseline says why it cannot serve a spec (``why_not``); ``check`` turns that into an error."""

    def why_not(self, ops: Operands) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, ops: Operands) -> None:
        why = self.why_not(ops)
        if why is not None:
            raise _refuse(self.name, ops, why)


class SDPABackend(Baseline):
    """torch ``scaled_dot_product_attention`` over query chunks (exact softmax, no certificate)."""

    name = "sdpa"

    def why_not(self, ops: Operands) -> str | None:
        ve = ops.spec.value_einsum
        if _order2_reason(ops) is None and (ve.summed or tuple(ve.value_letters[0]) != tuple(ve.out_letters)):
            return f"its value einsum {ops.spec.value!r} is not out_i = sum_j p_ij v_j"
        return _order2_reason(ops)

    def run(self, plan, ops: Operands) -> torch.Tensor:
        q, k = _expanded(ops, ops.dtype)
        Z, n, m = q.shape[0], ops.n, ops.ms[0]
        v = ops.values[0].reshape(Z, m, -1)
        budget = int(ops.options.get("memory_budget", 64 << 20))
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
        return out.reshape(Z, n, *ops.out_value_shape)


@lru_cache(maxsize=32)
def orthogonal_gaussian(rows: int, D: int, seed: int) -> torch.Tensor:
    """(rows, D) random matrix whose D-row blocks are orthogonal and whose rows have the norms of
    Gaussian vectors (Performer's "regular" orthogonal random features), float64, seeded. Cached:
    like a Performer layer, the features are drawn once per (rows, D, seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    g = torch.randn(math.ceil(rows / D), D, D, generator=gen, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed factor
    w = qmat.transpose(1, 2).reshape(-1, D)[:rows]
    norms = torch.randn(rows, D, generator=gen, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


class FavorBackend(Baseline):
    """Performer FAVOR+: exp(<x, y>) = E_w[phi(x) phi(y)] with phi(x) = exp(w.x - |x|^2/2)/sqrt(r),
    w orthogonal Gaussian (Choromanski et al. 2021, Lemma 1). Options: ``features`` (rank r,
    default 256) and ``seed`` (the random features are a deterministic function of it)."""

    name = "favor"

    def why_not(self, ops: Operands) -> str | None:
        return _order2_reason(ops)

    def check(self, ops: Operands) -> None:
        super().check(ops)
        _int_option(ops, "features", DEFAULT_FAVOR_FEATURES, 1)
        _int_option(ops, "seed", 0, 0)

    def run(self, plan, ops: Operands) -> torch.Tensor:
        rank = _int_option(ops, "features", DEFAULT_FAVOR_FEATURES, 1)
        seed = _int_option(ops, "seed", 0, 0)
        dtype = ops.dtype
        D = ops.D
        w = orthogonal_gaussian(rank, D, seed).to(device=ops.q.device, dtype=dtype)
        # s = scale <q, k> = <x, y> with x = sqrt|scale| q, y = sign(scale) sqrt|scale| k
        root = math.sqrt(abs(ops.scale))
        sign = 1.0 if ops.scale >= 0 else -1.0
        _, k = _expanded(ops, dtype)
        # Performer's key stabilizer: one global constant (it cancels in the normalization) taken
        # over every key, so no key feature overflows; queries use a per-row constant.
        key_shift = self._key_shift(k * (sign * root), w, ops)

        def project(x: torch.Tensor) -> torch.Tensor:
            return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)

        def query_features(x: torch.Tensor) -> torch.Tensor:
            p = project(x * root)
            return torch.exp(p - p.amax(dim=-1, keepdim=True))

        def key_features(x: torch.Tensor) -> torch.Tensor:
            return torch.exp(project(x * (sign * root)) - key_shift)

        engine = FactorizedAttention.from_ops(ops, query_features, key_features, rank, dtype)
        out = engine.run()
        if not bool(torch.isfinite(out).all()):
            raise InputError(
                f"backend='favor' produced non-finite outputs: its random features exp(w.x - |x|^2/2) "
                f"under/overflowed in {dtype} (beta = {plan.beta:.4g}). Fix: use float64 inputs, a "
                "smaller scale, or backend='exact'/'poly'"
            )
        return out

    @staticmethod
    def _key_shift(k: torch.Tensor, w: torch.Tensor, ops: Operands) -> torch.Tensor:
        budget = max(1, int(ops.options.get("memory_budget", 64 << 20)) // (k.element_size() * w.shape[0] * 2))
        chunk = max(1, budget // max(1, k.shape[0]))
        shift = torch.tensor(float("-inf"), dtype=k.dtype, device=k.device)
        with torch.no_grad():
            for j0 in range(0, k.shape[1], chunk):
                x = k[:, j0: j0 + chunk]
                p = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
                shift = torch.maximum(shift, p.max())
        return shift


class Taylor2Backend(Baseline):
    """Degree-2 Taylor kernel 1 + s + s^2/2 (always >= 1/2, so the normalizer never vanishes) with
    symmetric features of rank C(D+2, 2); the same function as [1, x, x (x) x / sqrt 2]."""

    name = "taylor2"

    def why_not(self, ops: Operands) -> str | None:
        if not ops.spec.separable:
            return "its score depends on i - j through W, so it has no per-token feature map"
        return None

    def run(self, plan, ops: Operands) -> torch.Tensor:
        dtype = ops.dtype
        w = torch.as_tensor(query_weights(TAYLOR2_COEFFS, ops.scale, ops.D, 2), dtype=dtype, device=ops.q.device)
        engine = FactorizedAttention.from_ops(
            ops,
            query_features=lambda x: feature_map(x, 2),
            key_features=lambda x: feature_map(x, 2),
            rank=rank_for(ops.D, 2),
            dtype=dtype,
            query_weights=w,  # folded into the combined statistics, as poly does
        )
        return engine.run()


__all__ = [
    "Baseline",
    "DEFAULT_FAVOR_FEATURES",
    "FavorBackend",
    "SDPABackend",
    "Taylor2Backend",
    "backends_serving",
    "orthogonal_gaussian",
]
