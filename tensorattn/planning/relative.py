"""Plan for relative-position attention by FFT-Toeplitz products (docs/design.md#relative-positions).

Alman & Song, *Fast RoPE Attention*: with s_ij = scale q_i^T W_{i-j} k_j = scale sum_{(a,b) in S}
q_ia W_{i-j}[a,b] k_jb, S the support of W (pairs with a nonzero entry for some offset),

    s^t = sum_{|mu| = t} t!/mu! prod_{(a,b) in mu} scale q_ia W_{i-j}[a,b] k_jb

over multisets mu of t pairs. So P(s) = sum_t c_t s^t = sum_mu w_mu x_mu(i) T_mu(i-j) y_mu(j) with
w_mu = c_|mu| scale^|mu| |mu|!/mu!, x_mu = prod q_a, y_mu = prod k_b, and T_mu(i-j) = prod W[a,b]
Toeplitz. One term per multiset mu: C(|S|+g, g) terms (the plan's ``rank``).

Terms whose pair multisets have the same row multiset alpha and column multiset beta share
x_alpha and y_beta, so they are summed into one Toeplitz kernel H_{alpha beta} (the (alpha, beta)
entry of the symmetric power Sym^t(W_{i-j}), weighted). The causal mask and the ALiBi factor
exp(-slope |i-j|) multiply every kernel exactly (they are Toeplitz too), so they cost nothing extra
and leave beta, hence the degree, unchanged.

This module decides the support, the degree (certificate), the term tables and the cost; the
backend ``tensorattn.backends.relative_fft`` only executes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from scipy import fft as scipy_fft

from ..approx.features import monomial_tables, rank_for
from ..approx.polynomials import Approximant
from ..errors import InputError
from .certificate import MAX_CERTIFIABLE_BETA, UNIT_ROUNDOFF, Certificate, certify

#: flops of one real FFT of length N (split radix, real input): about 2.5 N log2 N
FFT_FLOPS = 2.5
#: constant in the normwise error of FFT convolution, |error| <= c u log2 N ||h|| ||u|| sqrt(N)
FFT_ERROR_CONSTANT = 5.0
#: time per counted flop of the FFT path relative to exact relative attention (whose per-pair gather
#: of W_{i-j} is slow); ``backend='auto'`` uses it. Measured 0.23-0.41 for d = 4 rotations, n = 128
#: to 4,096, one thread (benchmarks/relative_scaling.py); the upper end keeps auto conservative.
RELATIVE_OVERHEAD = 0.4


class AllPairs(Sequence):
    """Every pair (a, b) of a d x d matrix, in row-major order, without building them: a plan for
    an unknown dense W of any d needs their count, and the list only when the rank is small."""

    def __init__(self, d: int):
        self.d = d

    def __len__(self) -> int:
        return self.d * self.d

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return divmod(i % len(self), self.d)

    def __iter__(self):
        return ((a, b) for a in range(self.d) for b in range(self.d))

    def __hash__(self) -> int:
        return hash(("all pairs", self.d))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AllPairs):
            return other.d == self.d
        return isinstance(other, tuple) and len(other) == len(self) and tuple(self) == other

    def __repr__(self) -> str:
        return f"AllPairs({self.d})"


@dataclass(frozen=True)
class RelativeSupport:
    """What the plan needs from W: its support, entrywise maxima and largest operator norm."""

    d: int
    pairs: tuple[tuple[int, int], ...]  # (a, b) with W_t[a, b] != 0 for some offset t, sorted
    abs_sum: float  # sum_{a,b} max_t |W_t[a, b]|
    abs_norm: float  # ||M||_2 with M[a, b] = max_t |W_t[a, b]|
    wnorm: float  # max_t ||W_t||_2
    constant: bool = False  # W_t is the same matrix at every offset (then s_ij = scale (q_i^T W) k_j)

    @classmethod
    def dense(cls, d: int, wnorm: float = 1.0) -> "RelativeSupport":
        """Unknown W with ||W_t||_2 <= wnorm: every pair, |W_t[a, b]| <= wnorm."""
        return cls(d, AllPairs(d), float(d * d * wnorm), float(d * wnorm), float(wnorm))

    @property
    def nnz(self) -> int:
        return len(self.pairs)


def max_spectral_norm(W: torch.Tensor) -> float:
    """max over offsets of ||W_t||_2, computed in float64 (one batched SVD over all L offsets)."""
    return float(torch.linalg.matrix_norm(W.detach().to(torch.float64), ord=2).max()) if W.shape[0] else 0.0


def relative_support(W: Any, d: int, wnorm: float | None = None) -> RelativeSupport:
    """Support and norms of W, shape (L, d, d) (numpy or torch); ``wnorm``: max_t ||W_t||_2 when
    the caller has it already (``max_spectral_norm``), so the batched SVD runs once per call."""
    Wt = W.detach() if isinstance(W, torch.Tensor) else torch.as_tensor(np.asarray(W))
    if Wt.ndim != 3 or tuple(Wt.shape[1:]) != (d, d):
        raise InputError(f"rel (W) has shape {tuple(Wt.shape)} but expected (L, {d}, {d}), L = q_offset+n+m-1")
    Wt = Wt.to(torch.float64).cpu()
    if Wt.shape[0] == 0:
        return RelativeSupport(d, (), 0.0, 0.0, 0.0)
    M = Wt.abs().amax(dim=0)
    a, b = torch.nonzero(M, as_tuple=True)
    wnorm = max_spectral_norm(Wt) if wnorm is None else float(wnorm)
    return RelativeSupport(
        d, tuple(zip(a.tolist(), b.tolist())), float(M.sum()), float(torch.linalg.matrix_norm(M, ord=2)), wnorm,
        constant=bool((Wt == Wt[:1]).all()),
    )


@dataclass(frozen=True)
class DegreeTerms:
    """Terms of degree t: the pairs of each multiset mu and the (alpha, beta) kernel it belongs to."""

    t: int
    weight_index: np.ndarray  # (R_t,): index of mu in the monomial_tables(|S|, g) order (its weight)
    pair_index: np.ndarray  # (R_t, t): the pairs of mu (indices into the support), nondecreasing
    kernel: np.ndarray  # (R_t,): kernel of mu, terms of one kernel are contiguous (sorted)
    kernel_alpha: np.ndarray  # (K_t,): row multiset alpha of each kernel (degree-t local index)
    kernel_beta: np.ndarray  # (K_t,): column multiset beta of each kernel (degree-t local index)
    n_alpha: int  # C(d+t-1, t): degree-t monomials of q
    n_beta: int

    @property
    def terms(self) -> int:
        return int(self.pair_index.shape[0])

    @property
    def kernels(self) -> int:
        return int(self.kernel_alpha.shape[0])


def _sorted_coordinates(D: int, g: int) -> list[np.ndarray]:
    """Per degree t, (R_t, t) coordinate lists of the degree-t monomials of monomial_tables(D, g)."""
    tab = monomial_tables(D, g)
    out = [np.zeros((1, 0), np.int64)]
    for t in range(1, g + 1):
        out.append(np.concatenate([out[-1][tab.parents[t]], tab.coords[t][:, None]], axis=1))
    return out


def _lookup_rows(reference: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Index of each row of ``rows`` in ``reference`` (every row is present; vectorized)."""
    if reference.shape[1] == 0:
        return np.zeros(rows.shape[0], np.int64)
    both = np.concatenate([reference, rows])
    _, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    where = np.empty(inverse.max() + 1, np.int64)
    where[inverse[: len(reference)]] = np.arange(len(reference))
    return where[inverse[len(reference):]]


@lru_cache(maxsize=16)
def toeplitz_terms(d: int, pairs: tuple[tuple[int, int], ...], g: int) -> tuple[DegreeTerms, ...]:
    """The term tables of every degree t <= g, in exact integer index arithmetic (no loop over mu)."""
    nnz = len(pairs)
    pa = np.array([p[0] for p in pairs], np.int64)
    pb = np.array([p[1] for p in pairs], np.int64)
    mu_coords = _sorted_coordinates(nnz, g)
    q_coords = _sorted_coordinates(d, g)
    out, first = [], 0
    for t in range(g + 1):
        idx = mu_coords[t]
        n_ab = math.comb(d + t - 1, t)
        alpha = _lookup_rows(q_coords[t], np.sort(pa[idx], axis=1))
        beta = _lookup_rows(q_coords[t], np.sort(pb[idx], axis=1))
        keys, kernel = np.unique(alpha * n_ab + beta, return_inverse=True)
        kernel = kernel.reshape(-1)
        order = np.argsort(kernel, kind="stable")
        out.append(DegreeTerms(
            t=t, weight_index=first + order, pair_index=idx[order], kernel=kernel[order],
            kernel_alpha=keys // n_ab, kernel_beta=keys % n_ab, n_alpha=n_ab, n_beta=n_ab,
        ))
        first += idx.shape[0]
    return tuple(out)


@dataclass(frozen=True)
class RelativeTerms:
    """The FFT-Toeplitz decomposition the plan chose (reported by ``ta.plan`` and AttentionInfo)."""

    support: RelativeSupport
    degree: int
    fft_len: int  # N >= n + m - 1: circular convolution of length N is the linear one we need
    terms: int  # multisets mu of size <= g over the support: C(|S|+g, g)
    kernels: int  # distinct (alpha, beta) Toeplitz kernels after grouping (an upper bound if not built)
    alibi_slope: float
    flops: int  # predicted flops of the FFT path

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return self.support.pairs

    @property
    def flops_per_term(self) -> float:
        return self.flops / max(self.terms, 1)

    def tables(self) -> tuple[DegreeTerms, ...]:
        return toeplitz_terms(self.support.d, self.support.pairs, self.degree)

    def describe(self) -> str:
        s = self.support
        return (
            f"{self.terms:,} over {s.nnz} of {s.d * s.d} (a,b) pairs of W -> {self.kernels:,} kernels, "
            f"FFT length {self.fft_len:,}, {self.flops_per_term:.3g} flops/term"
        )


def fft_length(n: int, m: int) -> int:
    """Smallest fast real-FFT length >= n + m - 1."""
    return int(scipy_fft.next_fast_len(max(1, n + m - 1), real=True))


def relative_flops(counts: list[tuple[int, int, int, int]], Z: int, n: int, m: int, e: int, N: int) -> int:
    """Flops of the FFT path as implemented, from per-degree (t, terms, kernels, C(d+t-1, t)).

    Kernels (products of W entries and one rFFT each) are shared over the batch; per batch entry come
    the rFFTs of the key blocks y_beta [v|1], the per-frequency kernel-by-block products (complex),
    one inverse rFFT per alpha block and the query contraction."""
    c = e + 1
    F = N // 2 + 1
    fft = FFT_FLOPS * N * math.log2(max(N, 2))
    L = n + m - 1
    total = 0.0
    for t, terms, kernels, n_ab in counts:
        total += L * terms * (t + 1) + kernels * fft
        total += Z * (n_ab * c * (m + fft) + kernels * c * F * 8 + n_ab * c * (fft + 2 * n) + (n + m) * n_ab)
    return int(total)


def relative_exact_flops(Z: int, n: int, m: int, d: int, E: int, causal: bool) -> int:
    """Exact relative attention contracts W_{i-j} per pair: 2 d^2 + 2 d for the score, 2E for values."""
    pairs = n * m // (2 if causal else 1)
    return Z * pairs * (2 * d * d + 2 * d + 2 * E + 10)


def fft_roundoff(approx: Approximant, beta: float, beta_abs: float, g: int, N: int, n: int, m: int,
                 decay: float, input_dtype: str) -> float:
    """Relative roundoff estimate of the FFT path (float64), against the smallest row normalizer.

    FFT convolution errs normwise: |error_i| <= c u log2 N sqrt(N) ||h||_2 ||u||_2, with
    ||h||_2 <= sqrt(n+m-1) max|h| and ||u||_2 <= sqrt(m) max|u|. Summed over the terms, max|x| max|h|
    max|y| is at most sum_t |c_t| beta_abs^t, beta_abs = scale sum_ab max|q_a| max_t|W_t[a,b]| max|k_b|.
    A row's normalizer is at least e^-beta e^-decay (``decay`` = slope times the distance from the
    row to its nearest key); numerator and denominator both err, hence the factor 2. float32 inputs
    add the rounding of W to the compute dtype.
    """
    u = UNIT_ROUNDOFF["float64"]
    if beta + decay > 700:
        return math.inf
    coeffs = approx.coefficients(float(beta), g)
    mag = float(np.sum(np.abs(coeffs) * float(beta_abs) ** np.arange(g + 1)))
    growth = FFT_ERROR_CONSTANT * math.log2(max(N, 2)) + 2 * g
    rnd = 2 * u * growth * math.sqrt(N * (n + m - 1) * m) * mag * math.exp(beta + decay)
    if input_dtype == "float32":
        rnd += 2 * UNIT_ROUNDOFF["float32"] * beta_abs
    return rnd


def _counts(support: RelativeSupport, g: int, tables: tuple[DegreeTerms, ...] | None):
    if tables is not None:
        return [(dt.t, dt.terms, dt.kernels, dt.n_alpha) for dt in tables]
    # not built (rank past max_rank): every term its own kernel, an upper bound
    return [(t, math.comb(support.nnz + t - 1, t), math.comb(support.nnz + t - 1, t), math.comb(support.d + t - 1, t))
            for t in range(g + 1)]


def choose_relative(
    approx: Approximant,
    support: RelativeSupport,
    *,
    beta: float,
    B: float,
    tol: float,
    n: int,
    m: int,
    Z: int,
    E: int,
    q_offset: int,
    alibi_slope: float | None,
    input_dtype: str,
    max_degree: int,
    max_rank: int,
    need_grad: bool,
    degree: int | None = None,
) -> tuple[Certificate | None, RelativeTerms | None, str]:
    """Smallest degree whose certificate (approximation on [-beta, beta] + FFT roundoff) meets tol.

    The FFT path always runs in float64: its error is normwise, so float32 would lose rows whose
    normalizer is small (causal starts, ALiBi decay). The FFT roundoff enters ``certify`` as its
    standard-model estimate u (2g + 4 sqrt(r + m_eff)) abs_sum(beta) e^beta for an equivalent plain
    sum of m_eff terms, so the certificate's roundoff, output and gradient errors all include it.
    Returns (certificate, terms, "") or, when no degree <= max_degree certifies tol, (None, None, why).
    A pinned ``degree`` is certified as it is, whatever tol.
    """
    if not beta <= MAX_CERTIFIABLE_BETA:
        return None, None, f"the score radius beta = {beta:.4g} is past {MAX_CERTIFIABLE_BETA:g} (no certificate)."
    d, nnz = support.d, support.nnz
    N = fft_length(n, m)
    wn = support.wnorm
    # beta_abs <= scale max|q| max|k| sum M = B^2 sum M / (d ||W||), and <= beta d ||M|| / ||W||
    beta_abs = 0.0 if wn == 0 else min(B * B * support.abs_sum / (d * wn), beta * d * support.abs_norm / wn)
    decay = float(alibi_slope or 0.0) * max(0, q_offset + n - m)  # rows past the last key
    u = UNIT_ROUNDOFF["float64"]
    for g in range(0, max_degree + 1) if degree is None else (degree,):
        want = fft_roundoff(approx, beta, beta_abs, g, N, n, m, decay, input_dtype)
        if not want < tol and (degree is None or not math.isfinite(want)):
            why = f"the float64 FFT roundoff alone ({want:.2e}) exceeds tol"
            if decay:
                why += (f": queries up to {max(0, q_offset + n - m)} positions past the last key scale every "
                        f"weight by exp(-alibi_slope * distance) = exp(-{decay:.4g})")
            return None, None, why + "."
        base = approx.abs_sum(beta, g) * math.exp(beta)
        root = max(0.0, (want / (u * base) - 2 * g) / 4) if base > 0 else 0.0
        r = rank_for(nnz, g)
        m_eff = max(m, math.ceil(root * root) - r)
        cert = certify(approx, beta, g, nnz, m_eff, 2, "float64")
        if degree is not None or (cert.output_error <= tol and (not need_grad or cert.grad_factor <= tol)):
            tables = toeplitz_terms(d, support.pairs, g) if r <= max_rank else None
            counts = _counts(support, g, tables)
            terms = RelativeTerms(
                support=support, degree=g, fft_len=N, terms=r, kernels=sum(c[2] for c in counts),
                alibi_slope=float(alibi_slope or 0.0), flops=relative_flops(counts, Z, n, m, E, N),
            )
            return cert, terms, ""
    return None, None, ""
