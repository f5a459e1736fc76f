"""Degree choice and the certified output and gradient errors of the polynomial method
(docs/design.md#the-certificate)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from ..approx.features import rank_for
from ..approx.polynomials import Approximant, first_candidate_degree, output_error
from ..request import Problem
from .cost import exact_key_blocks

#: significand bits (with the implicit one) of every dtype a computation or a result can have
SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
#: unit roundoff u = 2^-bits: rounding to nearest errs by at most u |x| in the normal range
UNIT_ROUNDOFF = {name: 2.0 ** -bits for name, bits in SIGNIFICAND_BITS.items()}
#: half the smallest subnormal: the largest rounding error below the normal range
SUBNORMAL_ERROR = {"float64": 2.0 ** -1075, "float32": 2.0 ** -150, "float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}
#: smallest normal number of each compute dtype (exp results below it lose relative accuracy)
SMALLEST_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126}
#: an exact computation stays in float32 while every partial product of the score contraction is
#: below this (float32 overflows at 2^128; the margin covers sums over the contracted indices)
FLOAT32_SAFE_RANGE = 2.0 ** 100
#: past this the scores may not fit in float64 either (overflows at 2^1024): the exact path refuses
FLOAT64_SAFE_RANGE = 2.0 ** 1000
#: beyond this score radius even float64 roundoff (~u e^{2 beta}) exceeds any useful tolerance
MAX_CERTIFIABLE_BETA = 18.0
#: roundings a gradient entry may take after the backend's backward (the power-of-two scale-back,
#: RoPE's rotation: two products and a sum), each up to half the smallest subnormal below the normal
#: range (``certify_gradients``)
GRADIENT_LAST_ROUNDINGS = 4
#: ``choose_certificate`` skips a degree when a floor of its gradient bound exceeds tol times this;
#: the margin (far above any rounding difference between the floor and the bound) keeps it from
#: ever skipping a degree that the whole bound would pass
GRADIENT_SKIP_MARGIN = 1.0 + 1e-6
#: float32 features are refused above this beta: cancellation makes roundoff ~ u e^{2 beta}
#: (docs/design.md#numerics)
FLOAT32_MAX_BETA = 4.0


@dataclass(frozen=True)
class Certificate:
    """The certified output error of one polynomial at one score radius. The gradient parts
    (``derivative_error``, ``derivative_roundoff``, ``grad_factor``) are computed on first use from
    the approximant and beta they belong to: a call that takes no gradient and asks for no
    gradient bound never pays for them."""

    degree: int
    rank: int
    approx_error: float  # certified relative error of the weights (exact arithmetic)
    roundoff: float  # floating-point estimate for the feature dtype (relative)
    output_error: float  # output_error(approx + roundoff): bound on max|out - exact| / vmax
    feature_dtype: str
    #: the approximant and score radius the certificate is for (the gradient parts need them)
    approximant: Approximant | None = field(default=None, compare=False, repr=False)
    beta: float = 0.0
    #: the sizes the roundoff estimate is for: expanded feature size, keys per slot, order
    D: int = field(default=0, compare=False, repr=False)
    m: int = field(default=0, compare=False, repr=False)
    order: int = field(default=2, compare=False, repr=False)

    @property
    def weight_error(self) -> float:
        """eps: relative error of every surrogate weight P(s) against e^s (approximation + roundoff)."""
        return self.approx_error + self.roundoff

    @cached_property
    def derivative_error(self) -> float:
        """Certified relative error of P' (exact arithmetic)."""
        if self.approximant is None:
            return math.inf
        try:
            return self.approximant.derivative_error(self.beta, self.degree)
        except NotImplementedError:  # pragma: no cover
            return math.inf

    @cached_property
    def derivative_roundoff(self) -> float:
        """Floating-point estimate for P' in the feature dtype: the backward sums the same r
        monomials and m tokens, with P' in place of P."""
        if self.approximant is None:
            return math.inf
        a = self.approximant
        return self.roundoff * a.abs_sum_derivative(self.beta, self.degree) / max(a.abs_sum(self.beta, self.degree),
                                                                                  1e-300)

    @cached_property
    def direct_roundoff(self) -> float:
        """Roundoff estimate when each weight P(s) is evaluated from its score (Horner) instead of
        from the features: the score's dot product of D (times k-1) terms errs by at most
        (D + k - 1) u beta, which moves P by max|P'| times that; Horner adds 2g u P_abs; the sums over
        the m tokens are estimated as in ``roundoff_estimate``. The backend evaluates P this way (the
        direct form, the causal diagonal blocks) only where this is at most ``roundoff``
        (docs/design.md#the-direct-form), so the certificate covers both."""
        a, b, g, k = self.approximant, self.beta, self.degree, self.order
        if a is None:
            return math.inf
        u = UNIT_ROUNDOFF[self.feature_dtype]
        mag = (2 * g + 4 * math.sqrt(self.m)) * a.abs_sum(b, g) + (self.D + k - 1) * b * a.abs_sum_derivative(b, g)
        return u * mag * math.exp(b) * max(1, k - 1)

    @property
    def direct_ok(self) -> bool:
        """Whether evaluating P from the scores stays within this certificate's roundoff."""
        return self.direct_roundoff <= self.roundoff

    @cached_property
    def grad_factor(self) -> float:
        """eta of docs/torch.md (G3): relative error of the score gradients."""
        return gradient_factor(self.weight_error, self.derivative_error + self.derivative_roundoff)


def roundoff_estimate(approx: Approximant, beta: float, g: int, rank: int, m: int, order: int, dtype: str) -> float:
    """Relative roundoff of the factorized evaluation.

    Each weight is a sum over r monomials and each statistic a sum over m tokens; both are bounded by
    P_abs(beta) = sum |c_t| beta^t (Hoelder), while the smallest exact weight is e^-beta. We use the
    standard-model estimate u (2g + 4 sqrt(r + m)) per sum (the worst case grows with r + m instead
    of its square root).
    """
    u = UNIT_ROUNDOFF[dtype]
    terms = math.sqrt(min(rank + m, 2**1000))  # a rank past 2^1000 is refused by max_rank anyway
    return u * (2 * g + 4 * terms) * approx.abs_sum(beta, g) * math.exp(beta) * max(1, order - 1)


def gradient_factor(eps: float, deps: float) -> float:
    """eta (docs/torch.md, eq. G3): with weights within relative eps and slopes within eps' of e^s,

        sum_tau |dL~/ds_tau - dL/ds_tau| <= eta * max_tau |<dO_i, V_tau>|   for every query i,

    eta = 2 (eps + eps') / (1 - eps) + rho(eps), rho the transfer lemma (``output_error``)."""
    if not eps < 1.0:
        return math.inf
    return float(2.0 * (eps + deps) / (1.0 - eps) + output_error(eps))


def gradient_floor(trunc: float, derivative_floor: float) -> float:
    """A floor of ``gradient_factor(eps, eps')`` from floors of its parts: eps >= the truncation
    error ``trunc`` and eps' >= ``derivative_floor`` (``Approximant.derivative_truncation_floor``),
    since the other parts of each are >= 0, and 1 - eps <= 1."""
    return 2.0 * (trunc + derivative_floor) + output_error(trunc)


def certify(approx: Approximant, beta: float, g: int, D: int, m: int, order: int, dtype: str) -> Certificate:
    r = rank_for(D, g)
    eps = approx.certified_error(beta, g)
    rnd = roundoff_estimate(approx, beta, g, r, m, order, dtype)
    return Certificate(g, r, eps, rnd, output_error(eps + rnd), dtype, approx, float(beta), D, m, order)


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
    feature_dtype: str | None = None,
) -> Certificate | None:
    """Smallest degree whose certified output (and, with need_grad, gradient) error is <= tol.

    The feature dtype is ``feature_dtype`` when pinned; else float64 when the input is float64,
    when beta > FLOAT32_MAX_BETA, or when float32 roundoff alone would use more than half of the
    tolerance."""
    if not beta <= MAX_CERTIFIABLE_BETA:
        return None
    for g in range(first_candidate_degree(approx, beta, tol, max_degree), max_degree + 1):
        trunc = approx.truncation_error(beta, g)
        if output_error(trunc) > tol:
            continue  # the truncation alone is too large: skip the costlier parts of the bound
        if need_grad and (gradient_floor(trunc, approx.derivative_truncation_floor(beta, g))
                          > tol * GRADIENT_SKIP_MARGIN):
            continue  # the gradient bound is at least this: it fails whatever the rest adds
        dtype = feature_dtype or input_dtype
        cert = certify(approx, beta, g, D, m, order, dtype)
        if feature_dtype is None and dtype == "float32":
            if beta > FLOAT32_MAX_BETA or cert.roundoff > tol / 2 or (need_grad and cert.derivative_roundoff > tol / 8):
                cert = certify(approx, beta, g, D, m, order, "float64")
        ok = cert.output_error <= tol and (not need_grad or cert.grad_factor <= tol)
        if ok:
            return cert
    return None


def certify_degree(approx: Approximant, beta: float, g: int, D: int, m: int, order: int, *,
                   input_dtype: str, feature_dtype: str | None = None) -> Certificate | None:
    """The certificate of a pinned degree ``g`` (experiments): features in ``feature_dtype``, or
    the dtype ``choose_certificate`` would use. None when beta is past certification."""
    if not beta <= MAX_CERTIFIABLE_BETA:
        return None
    dtype = feature_dtype or ("float64" if input_dtype == "float64" or beta > FLOAT32_MAX_BETA else "float32")
    return certify(approx, beta, g, D, m, order, dtype)


def rotation_error(problem: Problem) -> float:
    """Bound on max|out - exact| / vmax from the RoPE rotation (spec ``rope``), for every backend:
    cos and sin are evaluated in float64 from float64 angles (position * base^(-2l/d), off by at
    most u64 * angle <= u64 * last position for base >= 1) and rounded to the compute dtype, so every
    rotated coordinate errs by a few u |x|; the scores move by at most
    ds = beta (8 u + 2 u64 * last position), every weight by a factor within e^(+-2 ds)."""
    if problem.spec.positional != "rope":
        return 0.0
    last = problem.q_offset + problem.n + max(problem.ms)
    ds = problem.beta * (8 * UNIT_ROUNDOFF[problem.dtype] + 2 * last * UNIT_ROUNDOFF["float64"])
    return output_error(math.expm1(min(2 * ds, 700.0)))


def cast_error(magnitude: float, steps: Sequence[str]) -> float:
    """Bound on the error of rounding a result with |x| <= ``magnitude`` through the dtypes
    ``steps`` (from the dtype it is computed in to the dtype the caller receives): every narrowing
    step adds u |x| in the normal range plus half the smallest subnormal below it."""
    err = 0.0
    for a, b in zip(steps, steps[1:]):
        if SIGNIFICAND_BITS[b] < SIGNIFICAND_BITS[a]:
            err += UNIT_ROUNDOFF[b] * (magnitude + err) + SUBNORMAL_ERROR[b]
    return err


def _gamma(count: float, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a sum or product of n terms."""
    return count * u / (1.0 - count * u) if count * u < 1.0 else math.inf


def numeric_range(problem: Problem) -> float:
    """Bound on every magnitude an exact computation must represent: each partial sum and product of
    the score contraction (also times the scale), and the running sums of tuple values."""
    terms = problem.D * problem.D if problem.spec.positional == "relative" else problem.D
    linf = problem.linf or (problem.B,) * problem.order
    wnorm = problem.relative.wnorm if problem.relative is not None else 1.0
    contraction = terms * math.prod(max(1.0, x) for x in linf) * max(1.0, wnorm)
    return max(contraction * max(1.0, abs(problem.scale)), problem.beta, problem.vmax * math.prod(problem.ms))


def exact_dtype(problem: Problem) -> str:
    """The dtype the exact backend computes in: the inputs' compute dtype, or float64 when float32
    could overflow on these scores or values (so the output stays finite and right)."""
    if problem.dtype == "float64" or numeric_range(problem) > FLOAT32_SAFE_RANGE:
        return "float64"
    return "float32"


def exact_error(problem: Problem, dtype: str) -> float:
    """Bound on max|out - exact| / vmax for the exact backend computing in ``dtype``: the rounding
    of the scores, of exp(s - running max) and the online rescaling, and of the sums over key
    tuples; standard-model bounds, worst case in every term (docs/design.md#numerics)."""
    u = UNIT_ROUNDOFF[dtype]
    spec, k, beta = problem.spec, problem.order, problem.beta
    if spec.positional == "relative":
        support = problem.relative
        # |sum_ab q_a W_ab k_b| <= |q| || |W| ||_2 |k|: the absolute sum may exceed beta by || |W| || / ||W||
        ratio = support.abs_norm / support.wnorm if support is not None and support.wnorm > 0 else problem.D
        beta_abs, terms = beta * max(1.0, ratio), problem.D * problem.D
    else:
        beta_abs, terms = beta, problem.D
    blocks = exact_key_blocks(problem.ms)
    per_block = math.prod(blocks)
    n_blocks = math.prod(-(-m // b) for m, b in zip(problem.ms, blocks))
    tuples = math.prod(problem.ms)
    # relative error of every weight exp(s - max): the score (a sum of `terms` products of k
    # factors, times scale), the subtraction and exp (|s - max| <= 2 beta), one rescale per block
    eps = u * ((terms + k + 2) * beta_abs + 4 * beta_abs + 4 + 3 * n_blocks)
    err = output_error(eps)
    if problem.alibi_slope:
        # a bias b <= 0 errs by ~4u|b| relatively; weighted by e^b e^s over a normalizer >= e^-beta,
        # the total is at most min(max|b|, tuples e^(2 beta - 1)) (the nearest key has b = 0)
        biggest = problem.alibi_slope * (problem.q_offset + problem.n + max(problem.ms))
        err += 8 * u * min(biggest, tuples * math.exp(min(2 * beta, 700.0) - 1.0))
    # numerator and normalizer sums (within a block, then over blocks), the value products and
    # summed value indices, the division; weights that underflow err by < the smallest normal
    summed = max(1, math.prod(problem.value_dims) // max(1, problem.E))
    g = _gamma(per_block + n_blocks + k + summed + 2, u)
    err += 2 * g + u + 2 * tuples * SMALLEST_NORMAL[dtype]
    # the result is a rounded convex combination of the tuple values: never off by more than this
    cap = 1.0 + (1.0 + g) * (1.0 + u) / (1.0 - g) if g < 1.0 else math.inf
    return min(err, cap)


@dataclass(frozen=True)
class PolynomialCertificate:
    """The certificate of an attention polynomial: one polynomial per term.

    Every term's weight is within relative eps_t of exp(term), so the weight of a key tuple, the
    product over terms, is within prod_t (1 + eps_t) - 1 (``weight_error``); the transfer lemma
    turns that into ``output_error`` (per unit of max|v|), for any n."""

    terms: tuple[Certificate, ...]
    weight_error: float
    output_error: float
    feature_dtype: str

    @property
    def degree(self) -> int:
        """The largest degree over the terms (``degrees`` has each)."""
        return max(c.degree for c in self.terms)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(c.degree for c in self.terms)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(c.rank for c in self.terms)

    @property
    def rank(self) -> int:
        """The largest feature rank over the terms."""
        return max(self.ranks)

    @property
    def approx_error(self) -> float:
        return math.prod(1.0 + c.approx_error for c in self.terms) - 1.0

    @property
    def roundoff(self) -> float:
        return self.weight_error - self.approx_error

    @property
    def grad_factor(self) -> float:
        """No gradient certificate is derived for attention polynomials (autograd still runs)."""
        return math.inf


def weight_budget(tol: float) -> float:
    """The largest relative weight error eps whose output error (transfer lemma) is <= tol:
    2 eps / (1 + sqrt(1 - eps^2)) = 2 tan(theta / 2) for eps = sin(theta)."""
    return tol / (1.0 + tol * tol / 4.0)


def choose_polynomial_certificate(approx: Approximant, terms, tol: float, m: int, *, input_dtype: str,
                                  max_degree: int, feature_dtype: str | None = None,
                                  degree: int | None = None) -> PolynomialCertificate | None:
    """Per term, the smallest degree whose certified relative error (approximation + roundoff)
    fits its share of the budget: (1 + eps_t)^T <= 1 + eps with output_error(eps) <= tol.
    ``terms`` are the TermStats; a pinned ``degree`` is used for every term as it is."""
    if not all(t.beta <= MAX_CERTIFIABLE_BETA for t in terms):
        return None
    share = (1.0 + weight_budget(tol)) ** (1.0 / len(terms)) - 1.0
    # float64 unless pinned: the methods multiply features of several terms and merge monomials,
    # beyond what the single-term roundoff estimate models
    dtypes = [feature_dtype] if feature_dtype else ["float64"]
    for dtype in dtypes:
        if dtype == "float32" and feature_dtype is None and max(t.beta for t in terms) > FLOAT32_MAX_BETA:
            continue
        certs = []
        for t in terms:
            found = None
            for g in (range(0, max_degree + 1) if degree is None else (degree,)):
                if degree is None and approx.truncation_error(t.beta, g) > share:
                    continue
                cert = certify(approx, t.beta, g, t.D, m, t.order, dtype)
                if degree is not None or cert.weight_error <= share:
                    found = cert
                    break
            if found is None:
                break
            certs.append(found)
        else:
            eps = math.prod(1.0 + c.weight_error for c in certs) - 1.0
            rnd = eps - (math.prod(1.0 + c.approx_error for c in certs) - 1.0)
            if dtype == "float32" and feature_dtype is None and rnd > tol / 2:
                continue  # float32 roundoff would use more than half of tol: use float64
            return PolynomialCertificate(tuple(certs), eps, output_error(eps), dtype)
    return None


@dataclass(frozen=True)
class GradientBound:
    """Certified bounds on the gradient error of the poly surrogate, per input (docs/torch.md).

    For each input X (``names``: "q", the keys, the values), with dO the upstream gradient and rows
    dO_i of shape (E,):

        max over tokens of || dL~/dX_token - dL/dX_token ||_2  <=  per_l1[X] * max_i ||dO_i||_1

    and, for values, also <= per_max[X] * max|dO|, plus ``floor[X]``: the rounding of the computed
    gradient into its dtype below the normal range (half the smallest subnormal per entry), which no
    relative bound covers when the gradient itself is that small. Each bound covers every entry of
    the gradient.
    """

    names: tuple[str, ...]
    per_l1: tuple[float, ...]
    per_max: tuple[float, ...]
    floor: tuple[float, ...] = ()

    @property
    def unit(self) -> float:
        """The largest bound over inputs for max_i ||dO_i||_1 = 1 (``AttentionInfo.grad_error_bound``)."""
        return max(self.per_l1)

    def for_upstream(self, dout_l1: float, dout_max: float) -> dict[str, float]:
        """Bounds for an upstream gradient with max_i ||dO_i||_1 = dout_l1 and max|dO| = dout_max."""
        def times(a: float, x: float) -> float:
            return 0.0 if a == 0.0 or x == 0.0 else a * x

        floor = self.floor or (0.0,) * len(self.names)
        return {name: min(times(a, dout_l1), times(b, dout_max)) + (f if dout_max > 0.0 else 0.0)
                for name, a, b, f in zip(self.names, self.per_l1, self.per_max, floor)}


def _column_mass(n_visible: np.ndarray, ratio: float) -> float:
    """sum over queries of min(1, ratio / visible): bounds how much attention one key can collect."""
    vis = n_visible[n_visible > 0].astype(np.float64)
    return float(np.minimum(1.0, ratio / vis).sum())


def _visible_keys(ops, slot: int, qpos: np.ndarray) -> list[np.ndarray]:
    """How many keys of ``slot`` each query sees, per batch row (one row when no key mask of that
    slot tells the rows apart): the causal prefix, counting only unmasked keys under a binary key
    mask (a masked key's weight is 0, so the visible ones share all the attention)."""
    m_s = ops.ms[slot]
    first = int(ops.k_positions(slot)[0]) if m_s else 0
    seen = np.clip(qpos - first + 1, 0, m_s) if ops.causal else np.full(ops.n, m_s)  # keys 0..seen-1
    bias = ops.key_bias[slot] if ops.key_bias and ops.key_mask == "binary" else None
    if bias is None:
        return [seen]
    unmasked = (bias.detach() == 0).reshape(-1, m_s).cpu().numpy()
    prefix = np.concatenate([np.zeros((unmasked.shape[0], 1), np.int64), np.cumsum(unmasked, axis=1)], axis=1)
    return list(prefix[:, seen])


def certify_gradients(plan, ops, maxima) -> GradientBound | None:
    """The certified gradient bound of docs/torch.md (G4-G6) for one call.

    ``maxima`` carries the per-operand maxima (expanded l2 norms, max |entry|, max |value|, ||W||_2)
    that beta was built from. Exact gets zeros; backends without a certificate get None.
    """
    from .bounds import _missing_factor

    spec = ops.spec
    k = spec.order
    nk = k - 1
    names = ("q", "k", "v") if nk == 1 else (
        "q", *(f"k[{i}]" for i in range(nk)), *(f"v[{i}]" for i in range(nk)))
    if plan.backend == "exact":
        zeros = (0.0,) * len(names)
        return GradientBound(names, zeros, zeros)
    cert = plan.certificate
    if plan.backend != "poly" or cert is None or spec.is_polynomial:
        return None  # no certificate, or an attention polynomial (no gradient certificate derived)
    se, ve = spec.score_einsum, spec.value_einsum
    eps, eta = cert.weight_error, cert.grad_factor
    pf = 2.0 * eps / (1.0 - eps) if eps < 1 else math.inf  # |p~ - p| <= pf * p (G5)
    l2, linf, vals = list(maxima.l2), list(maxima.linf), list(maxima.vals)
    scale = abs(ops.scale)
    # S_m >= ||ds/dX_m||_2 by the Hoelder argument that gives beta (G4)
    sens = []
    for m in range(k):
        mf = _missing_factor(se.features[m], se.contracted, ops.sizes)
        best = min(l2[a] * math.prod(linf[b] for b in range(k) if b not in (m, a)) for a in range(k) if a != m)
        sens.append(scale * mf * best * maxima.wnorm)
    # C_m >= max_j sum_i P_i(slot m = j): a visible weight is at most e^{2 beta} times any other (G6).
    # An additive key mask moves the scores off [-beta, beta] (as ALiBi does): no such ratio then.
    slope = ops.alibi_slope if spec.positional == "relative" else None
    ratio = math.inf if slope or ops.key_mask == "additive" else math.exp(min(2.0 * plan.beta, 700.0))
    qpos = ops.q_positions().cpu().numpy()
    mass = []
    for s in range(nk):
        mass.append(max(_column_mass(visible, ratio) for visible in _visible_keys(ops, s, qpos)))
    vmax = plan.vmax
    # the gradients' own size (G3-G5 without the error factors): |g_tau| <= 2 p_tau A_i for q and
    # the keys, and sum_i P_i(j) |dO_i| (times the other slots' values) for a value slot
    size_l1 = [2.0 * vmax * sens[0]] + [2.0 * vmax * sens[1 + s] * mass[s] for s in range(nk)]
    per_l1 = [eta * x / 2.0 for x in size_l1]
    # by max|dO| instead: A_i = ||dO_i||_1 vmax <= E max|dO| vmax, E the output entries per query
    E = math.prod(ops.out_value_shape)
    size_max = [x * E for x in size_l1]
    for s in range(nk):
        others = math.prod(vals[:s] + vals[s + 1:])
        letters = ve.value_letters[s]
        summed = math.prod(ops.value_sizes[c] for c in ve.summed if c not in letters)
        free_out = math.prod(ops.value_sizes[c] for c in ve.out_letters if c not in letters)
        size_l1.append(mass[s] * others * summed)
        size_max.append(mass[s] * others * summed * free_out)
        per_l1.append(pf * size_l1[-1])
    per_max = [eta * x / 2.0 for x in size_max[:k]] + [pf * x for x in size_max[k:]]
    # each gradient is rounded last in the compute dtype (from the float64 features, or by its last
    # ops), then cast to its input's dtype (fp16/bf16 inputs): u times its size, plus the error
    # itself, per rounding and token row
    compute = plan.problem.dtype
    dtypes = ops.input_dtypes or (compute,) * len(names)
    u = [UNIT_ROUNDOFF[compute] + UNIT_ROUNDOFF[d] * (1.0 + UNIT_ROUNDOFF[compute])
         if SIGNIFICAND_BITS[d] < SIGNIFICAND_BITS[compute] else UNIT_ROUNDOFF[compute] for d in dtypes]
    per_l1 = [b + ux * (b + m) for b, m, ux in zip(per_l1, size_l1, u)]
    per_max = [b + ux * (b + m) for b, m, ux in zip(per_max, size_max, u)]
    # below the normal range those last roundings err by up to half the smallest subnormal per entry
    # each, whatever the size: a few per entry in the compute dtype (the scale-back, RoPE's rotation:
    # two products and a sum) and the cast, so sqrt(entries per token) times that per token row
    rows = [ops.q, *ops.keys, *ops.values]
    floor = tuple((GRADIENT_LAST_ROUNDINGS * SUBNORMAL_ERROR[compute]
                   + (SUBNORMAL_ERROR[d] if SIGNIFICAND_BITS[d] < SIGNIFICAND_BITS[compute] else 0.0))
                  * math.sqrt(math.prod(t.shape[2:])) for t, d in zip(rows, dtypes))
    return GradientBound(names, tuple(per_l1), tuple(per_max), floor)
