"""Polynomial approximants of exp on [-beta, beta] with rigorous relative-error certificates.

One interface, small classes (compare numpy.polynomial): ``coefficients(beta, g)`` gives monomial
coefficients c_t of P(s) = sum_t c_t s^t, ``certified_error(beta, g)`` a rigorous bound on
max_{|s|<=beta} |P(s)/e^s - 1|, and ``degree_for(beta, tol)`` the smallest degree whose certified
*output* error (after the transfer lemma) is at most ``tol``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

from ..errors import InputError, valid_names

U64 = np.finfo(np.float64).eps / 2
#: the largest polynomial degree tried by default (``Request.max_degree``)
DEFAULT_MAX_DEGREE = 40
#: relative accuracy we assume for scipy's modified Bessel functions (documented ~1e-15).
BESSEL_REL_ERR = 1e-14
#: below this score radius the Chebyshev coefficients are the Taylor ones (their limit as beta -> 0)
TINY_BETA = 1e-100


def output_error(eps: float) -> float:
    """Transfer lemma: weights within relative eps give outputs within this multiple of max|v|.

    If every weight w~ = w(1 + delta) with |delta| <= eps, then for out = sum w~ v / sum w~ the
    error per entry is at most 2 eps / (1 + sqrt(1 - eps^2)) * max|v| (independent of n)."""
    if not eps < 1.0:
        return math.inf
    return 2.0 * eps / (1.0 + math.sqrt(1.0 - eps * eps))


@lru_cache(maxsize=None)
def _chebyshev_monomials(k: int) -> tuple[int, ...]:
    """Integer monomial coefficients of T_k (T_{k+1} = 2x T_k - T_{k-1})."""
    if k == 0:
        return (1,)
    if k == 1:
        return (0, 1)
    a, b = _chebyshev_monomials(k - 2), _chebyshev_monomials(k - 1)
    out = [0] * (k + 1)
    for i, c in enumerate(b):
        out[i + 1] += 2 * c
    for i, c in enumerate(a):
        out[i] -= c
    return tuple(out)


@lru_cache(maxsize=512)
def _chebyshev_coefficients(beta: float, g: int) -> np.ndarray:
    """Monomial coefficients of the degree-g Chebyshev truncation of exp on [-beta, beta]."""
    beta = float(beta)
    if beta < TINY_BETA:
        # the beta -> 0 limit of the series is the Taylor polynomial: exact value *and* slope at
        # s = 0, so gradients of the surrogate are right even when every score is 0. Below
        # TINY_BETA the two differ by far less than float64 rounding, and scipy's I_k(beta)
        # underflow (to 0, or NaN near the smallest normal) would lose the slope.
        return np.array([1.0 / math.factorial(t) for t in range(g + 1)])
    # exact rational arithmetic in Python integers, one correctly rounded division per coefficient:
    # a_k = ints[k] / den (the float Bessel values, exactly), c_t = sum_k a_k T_k[t] / beta^t
    ratios = [x.as_integer_ratio() for x in special.iv(_orders(g), beta).tolist()]
    den = max(d for _, d in ratios)  # powers of two: each divides the largest
    mono = [0] * (g + 1)
    for k, (num, d) in enumerate(ratios):
        a = num * (den // d) * (1 if k == 0 else 2)
        for t, c in _chebyshev_terms(k):
            mono[t] += a * c
    p, q = beta.as_integer_ratio()  # beta = p / q, so 1 / beta^t = q^t / p^t
    out, qt, pt = [], 1, den
    for m in mono:
        out.append((m * qt) / pt)
        qt, pt = qt * q, pt * p
    return np.array(out)


@lru_cache(maxsize=None)
def _orders(g: int) -> np.ndarray:
    """0, 1, ..., g: the Bessel orders of a degree-g series."""
    return np.arange(g + 1)


@lru_cache(maxsize=None)
def _chebyshev_terms(k: int) -> tuple[tuple[int, int], ...]:
    """(t, coefficient) of the nonzero monomials of T_k."""
    return tuple((t, c) for t, c in enumerate(_chebyshev_monomials(k)) if c)


@lru_cache(maxsize=1024)
def _abs_sum(approx: "Approximant", beta: float, g: int) -> float:
    """The planner asks for P_abs several times per call at one (beta, g): compute it once."""
    return approx._abs_sum(beta, g)


@lru_cache(maxsize=1024)
def _abs_sum_derivative(approx: "Approximant", beta: float, g: int) -> float:
    return approx._abs_sum_derivative(beta, g)


@lru_cache(maxsize=4096)
def _truncation_fails(approx: "Approximant", beta: float, tol: float, max_degree: int) -> int:
    """The number of degrees 0, 1, ... whose truncation error alone exceeds tol at this beta."""
    for g in range(max_degree + 1):
        if output_error(approx.truncation_error(beta, g)) <= tol:
            return g
    return max_degree + 1


def first_candidate_degree(approx: "Approximant", beta: float, tol: float, max_degree: int) -> int:
    """A degree below which no polynomial can certify ``tol`` at ``beta``: the truncation error alone
    is too large there. The truncation error grows with beta, so the count found at the power of two
    2^floor(log2 beta) <= beta holds at beta too; it is reused for every beta in that octave. An
    approximant that does not declare ``truncation_grows`` gets 0 (every degree is tried)."""
    if not approx.truncation_grows or not beta > 0.0 or not math.isfinite(beta):
        return 0
    return _truncation_fails(approx, 2.0 ** math.floor(math.log2(beta)), float(tol), int(max_degree))


class Approximant:
    """Base class: a family of polynomials P_g approximating exp on [-beta, beta]."""

    name = "base"
    #: whether a degree whose truncation error fails tol at some beta fails it at every larger beta
    #: (lets the degree search skip those degrees, ``first_candidate_degree``)
    truncation_grows = False

    def coefficients(self, beta: float, g: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def truncation_error(self, beta: float, g: int) -> float:  # pragma: no cover - abstract
        """Rigorous bound on max |P_g(s) - e^s| / e^s over |s| <= beta, in exact arithmetic."""
        raise NotImplementedError

    def abs_sum(self, beta: float, g: int) -> float:
        """sum_t |c_t| beta^t: the magnitude that roundoff in features is relative to."""
        return _abs_sum(self, float(beta), int(g))

    def _abs_sum(self, beta: float, g: int) -> float:
        # a Python sum: for the few coefficients of a typical degree it is faster than numpy's
        return float(sum(abs(c) * beta**t for t, c in enumerate(self.coefficients(beta, g).tolist())))

    def abs_sum_derivative(self, beta: float, g: int) -> float:
        """sum_t t |c_t| beta^(t-1) >= max |P'(s)| on |s| <= beta: the roundoff scale of gradients."""
        return _abs_sum_derivative(self, float(beta), int(g))

    def _abs_sum_derivative(self, beta: float, g: int) -> float:
        beta = float(beta)
        return float(sum(t * abs(c) * beta ** (t - 1) for t, c in enumerate(self.coefficients(beta, g).tolist())
                         if t))

    def certified_error(self, beta: float, g: int) -> float:
        """Certified relative error of the float64 coefficients, max |P(s)/e^s - 1| on |s|<=beta."""
        beta = float(beta)
        trunc = self.truncation_error(beta, g)
        # coefficients are stored in float64: each carries relative error <= 4u after conversion
        coef = 4 * U64 * self.abs_sum(beta, g) * math.exp(beta)
        return trunc + coef + self._coefficient_input_error(beta, g)

    def _coefficient_input_error(self, beta: float, g: int) -> float:
        return 0.0

    def degree_for(self, beta: float, tol: float, max_degree: int = DEFAULT_MAX_DEGREE) -> int | None:
        """Smallest g <= max_degree with output_error(certified_error(beta, g)) <= tol, else None."""
        for g in range(0, max_degree + 1):
            if output_error(self.certified_error(beta, g)) <= tol:
                return g
        return None

    def derivative_error(self, beta: float, g: int) -> float:
        """Certified bound on max |P'(s) - e^s| / e^s over |s| <= beta for the float64 coefficients.

        This is eps'(beta, g) of docs/design.md#gradients; the gradient certificate (planning/certificate.py,
        docs/torch.md) is built from it and from ``certified_error``."""
        beta = float(beta)
        # float64 rounding of each c_t: relative <= 4u, so |dP'| <= 4u sum_t t |c_t| beta^(t-1)
        coef = 4 * U64 * self.abs_sum_derivative(beta, g) * math.exp(beta)
        return self.derivative_truncation_error(beta, g) + coef + self._derivative_input_error(beta, g)

    def derivative_truncation_error(self, beta: float, g: int) -> float:  # pragma: no cover - abstract
        """Rigorous bound on max |P_g'(s) - e^s| / e^s over |s| <= beta, in exact arithmetic."""
        raise NotImplementedError

    def derivative_truncation_floor(self, beta: float, g: int) -> float:
        """A cheap number never above ``derivative_truncation_error(beta, g)`` as computed (0.0 when
        the approximant has none): the degree search skips, without computing the whole gradient
        certificate, a degree whose gradient bound this already puts past tol."""
        return 0.0

    def _derivative_input_error(self, beta: float, g: int) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Chebyshev(Approximant):
    """Truncated Chebyshev series of exp(beta t) on [-1, 1], t = s / beta.

    exp(beta t) = I_0(beta) + 2 sum_{k>=1} I_k(beta) T_k(t) (Abramowitz & Stegun 9.6.34), so the
    truncation error is at most 2 sum_{k>g} I_k(beta) <= 2 I_{g+1}(beta) / (1 - beta / (2(g+2)))
    using I_{k+1}(beta) <= beta I_k(beta) / (2(k+1)); dividing by min e^s = e^-beta gives the
    relative bound (docs/design.md#the-certificate).
    """

    name = "chebyshev"
    # e^beta I_{g+1}(beta) / (1 - ratio) grows with beta while ratio < 1; past it the bound is
    # e^{2 beta} >= 1, which fails every tol, so a degree that fails keeps failing
    truncation_grows = True

    @staticmethod
    @lru_cache(maxsize=1024)  # the degree search and the certificate ask for the same (beta, g)
    def _tail(beta: float, g: int) -> float:
        """Rigorous bound on sum_{k>g} I_k(beta), scaled by e^-beta (i.e. using ive)."""
        if beta == 0.0:
            return 0.0
        ratio = beta / (2.0 * (g + 2))
        first = float(special.ive(g + 1, beta)) * (1 + BESSEL_REL_ERR)
        if ratio < 1.0:
            return first / (1.0 - ratio)
        return 0.5  # I_0 + 2 sum I_k = e^beta, so the tail is at most e^beta / 2

    def truncation_error(self, beta: float, g: int) -> float:
        # e^beta * 2 * sum_{k>g} I_k(beta) = e^{2 beta} * 2 * tail_scaled
        return math.exp(2.0 * beta) * 2.0 * self._tail(beta, g)

    def _coefficient_input_error(self, beta: float, g: int) -> float:
        # Bessel values carry relative error <= BESSEL_REL_ERR; |T_k| <= 1 on [-1, 1]
        total = sum(special.ive(_orders(g), beta).tolist()) * 2.0 * math.exp(beta)
        return BESSEL_REL_ERR * total * math.exp(beta)

    def coefficients(self, beta: float, g: int) -> np.ndarray:
        return _chebyshev_coefficients(float(beta), int(g)).copy()

    def derivative_truncation_error(self, beta: float, g: int) -> float:
        # P_g' - e^s = -d/ds sum_{k>g} 2 I_k(beta) T_k(s/beta) and |T_k'| <= k^2 on [-1, 1] (Markov),
        # so |P_g' - e^s| <= beta^-1 sum_{k>g} 2 k^2 I_k(beta); divide by min e^s = e^-beta (docs/design.md#gradients)
        if beta == 0.0:
            return 0.0 if g >= 1 else 1.0  # Taylor coefficients at beta = 0: P' = 1 = e^0 once g >= 1
        K = g + 1 + max(64, 2 * math.ceil(beta))
        ks = np.arange(g + 1, K + 1)
        terms = 2.0 * ks.astype(float) ** 2 * special.ive(ks, beta) * (1 + BESSEL_REL_ERR)
        # beyond K: term ratio ((k+1)/k)^2 I_{k+1}/I_k <= (k+1) beta / (2 k^2) =: rho <= 1/2 for k >= K
        rho = (K + 1) * beta / (2.0 * K * K)
        tail = float(np.sum(terms)) + float(terms[-1]) * rho / (1.0 - rho)
        return math.exp(2.0 * beta) * tail / beta

    def derivative_truncation_floor(self, beta: float, g: int) -> float:
        # the first term (k = g + 1) of the sum above, without its (1 + BESSEL_REL_ERR): the sum of
        # nonnegative terms, rounded, is never below it, and the same positive factors follow
        if beta == 0.0:
            return 0.0
        k = float(g + 1)
        return math.exp(2.0 * beta) * (2.0 * k**2 * float(special.ive(g + 1, beta))) / beta

    def _derivative_input_error(self, beta: float, g: int) -> float:
        # Bessel values carry relative error <= BESSEL_REL_ERR; |T_k'(t)| / beta <= k^2 / beta
        if beta == 0.0:
            return 0.0
        ks = np.arange(g + 1)
        total = float(np.sum(2.0 * ks.astype(float) ** 2 * special.ive(ks, beta))) * math.exp(beta) / beta
        return BESSEL_REL_ERR * total * math.exp(beta)


class Taylor(Approximant):
    """Truncated Taylor series sum_{t<=g} s^t / t!, with the Lagrange remainder as certificate:
    |e^s - P(s)| <= e^{max(s,0)} |s|^{g+1} / (g+1)!, so relative error <= e^{2 beta} beta^{g+1}/(g+1)!."""

    name = "taylor"
    truncation_grows = True

    def coefficients(self, beta: float, g: int) -> np.ndarray:
        return np.array([1.0 / math.factorial(t) for t in range(g + 1)])

    def truncation_error(self, beta: float, g: int) -> float:
        beta = float(beta)
        return math.exp(2.0 * beta + (g + 1) * math.log(beta) - math.lgamma(g + 2)) if beta > 0 else 0.0

    def derivative_truncation_error(self, beta: float, g: int) -> float:
        # P' is the degree g-1 Taylor polynomial: relative error <= e^{2 beta} beta^g / g!
        if beta == 0.0:
            return 0.0 if g >= 1 else 1.0
        return math.exp(2.0 * beta + g * math.log(beta) - math.lgamma(g + 1))

    def derivative_truncation_floor(self, beta: float, g: int) -> float:
        return self.derivative_truncation_error(beta, g)  # as cheap as a floor would be


APPROXIMANTS: dict[str, Approximant] = {"chebyshev": Chebyshev(), "taylor": Taylor()}


def get_approximant(name: str | Approximant) -> Approximant:
    if isinstance(name, Approximant):
        return name
    try:
        return APPROXIMANTS[name]
    except KeyError:
        raise InputError(
            f"unknown approximant {name!r}; valid approximants are {valid_names(name, APPROXIMANTS)}"
        ) from None
