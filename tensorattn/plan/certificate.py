"""Degree choice and the certified output error of the polynomial method (DESIGN 5.2, 5.5, 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..approx.features import rank_for
from ..approx.polynomials import Approximant, output_error

UNIT_ROUNDOFF = {"float32": float(np.finfo(np.float32).eps) / 2, "float64": float(np.finfo(np.float64).eps) / 2}
#: beyond this score radius even float64 roundoff (~u e^{2 beta}) exceeds any useful tolerance
MAX_CERTIFIABLE_BETA = 18.0
#: float32 features are refused above this beta: cancellation makes roundoff ~ u e^{2 beta} (DESIGN 6)
FLOAT32_MAX_BETA = 4.0


@dataclass(frozen=True)
class Certificate:
    degree: int
    rank: int
    approx_error: float  # certified relative error of the weights (exact arithmetic)
    roundoff: float  # floating-point estimate for the feature dtype (relative)
    output_error: float  # output_error(approx + roundoff): bound on max|out - exact| / vmax
    grad_factor: float  # eta: dimensionless gradient error factor (DESIGN 5.5, docs/torch.md)
    feature_dtype: str


def roundoff_estimate(approx: Approximant, beta: float, g: int, rank: int, m: int, order: int, dtype: str) -> float:
    """Relative roundoff of the factorized evaluation.

    Each weight is a sum over r monomials and each statistic a sum over m tokens; both are bounded by
    P_abs(beta) = sum |c_t| beta^t (Hoelder), while the smallest exact weight is e^-beta. We use the
    standard-model estimate u (2g + 4 sqrt(r + m)) per sum (the worst case grows with r + m instead
    of its square root).
    """
    u = UNIT_ROUNDOFF[dtype]
    return u * (2 * g + 4 * math.sqrt(rank + m)) * approx.abs_sum(beta, g) * math.exp(beta) * max(1, order - 1)


def certify(approx: Approximant, beta: float, g: int, D: int, m: int, order: int, dtype: str) -> Certificate:
    r = rank_for(D, g)
    eps = approx.certified_error(beta, g)
    rnd = roundoff_estimate(approx, beta, g, r, m, order, dtype)
    out = output_error(eps + rnd)
    try:
        deps = approx.derivative_error(beta, g)
    except NotImplementedError:  # pragma: no cover
        deps = math.inf
    e = eps + rnd
    grad = 2.0 * (deps + rnd + e) / (1.0 - e) + out if e < 1 else math.inf
    return Certificate(g, r, eps, rnd, out, grad, dtype)


def choose_certificate(
    approx: Approximant,
    beta: float,
    tol: float,
    D: int,
    m: int,
    order: int,
    *,
    input_dtype: str,
    max_degree: int,
    need_grad: bool = False,
) -> Certificate | None:
    """Smallest degree whose certified output (and, with need_grad, gradient) error is <= tol.

    The feature dtype is float64 when the input is float64, when beta > FLOAT32_MAX_BETA, or when
    float32 roundoff alone would use more than half of the tolerance."""
    if not beta <= MAX_CERTIFIABLE_BETA:
        return None
    for g in range(0, max_degree + 1):
        dtype = input_dtype
        if dtype == "float32":
            c32 = certify(approx, beta, g, D, m, order, "float32")
            if beta > FLOAT32_MAX_BETA or c32.roundoff > tol / 2:
                dtype = "float64"
        cert = certify(approx, beta, g, D, m, order, dtype)
        ok = cert.output_error <= tol and (not need_grad or cert.grad_factor <= tol)
        if ok:
            return cert
    return None
