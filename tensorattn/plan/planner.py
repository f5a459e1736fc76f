"""Plan: bound check, degree choice, certificate, cost model and backend choice, in one report."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from ..approx.features import rank_for
from ..approx.polynomials import get_approximant
from ..errors import BoundError, InputError, closest_names
from ..spec import Spec, get_spec
from .bounds import threshold
from .certificate import Certificate, choose_certificate
from .cost import POLY_OVERHEAD, exact_flops, poly_flops
from .relative import (
    RELATIVE_OVERHEAD,
    RelativeSupport,
    RelativeTerms,
    choose_relative,
    relative_exact_flops,
    relative_support,
)

ON_UNBOUNDED = ("raise", "fallback", "ignore")

SETH_SENTENCE = (
    "Past tau_k(n) = (ln n)^(1/k), no algorithm computes order-{k} attention in truly "
    "sub-n^{k} time under SETH (Alman & Song), so no low-rank polynomial can be both fast and "
    "accurate here."
)


class BoundWarning(UserWarning):
    """Emitted when on_unbounded='fallback' runs exact instead of poly."""


def _fmt_int(x: int | None) -> str:
    return "n/a" if x is None else f"{x:,}"


def _fmt_flops(x: float) -> str:
    return f"{x:.3e}"


@dataclass(frozen=True)
class Plan:
    """How one attention call will be computed, and why. ``repr`` prints a human report."""

    spec: Spec
    n: int
    ms: tuple[int, ...]
    D: int
    value_dims: tuple[int, ...]
    E: int
    Z: int
    causal: bool
    scale: float
    tol: float
    beta: float
    B: float
    threshold: float
    passed: bool
    certificate: Certificate | None
    approximant: str
    flops_exact: int
    flops_poly: int | None
    backend: str
    requested: str
    reason: str
    vmax: float = 1.0
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the FFT-Toeplitz terms of the relative path (spec ``relative``), else None
    relative: RelativeTerms | None = None

    @property
    def order(self) -> int:
        return self.spec.order

    @property
    def degree(self) -> int | None:
        return self.certificate.degree if self.certificate else None

    @property
    def rank(self) -> int | None:
        return self.certificate.rank if self.certificate else None

    @property
    def verdict(self) -> str:
        return "within bound" if self.passed else "past threshold"

    @property
    def error_bound(self) -> float | None:
        """Certified bound on max|out - exact| for the chosen backend (0.0 for exact)."""
        if self.backend == "exact":
            return 0.0
        if self.backend == "poly" and self.certificate is not None:
            return self.certificate.output_error * self.vmax
        return None

    @property
    def grad_error_bound(self) -> float | None:
        """Certified bound on max_i sum_tau |dL~/ds_i,tau - dL/ds_i,tau|, the error of the gradient
        w.r.t. the *scores*, per unit of max_i ||dO_i||_1 (docs/torch.md, G3). Data-free; the
        bounds for the gradients w.r.t. q, k, v are ``AttentionInfo.grad`` / ``ta.grad_error_bound``."""
        if self.backend == "exact":
            return 0.0
        if self.backend == "poly" and self.certificate is not None:
            return self.certificate.grad_factor * self.vmax
        return None

    @property
    def flops(self) -> int | None:
        return self.flops_exact if self.backend == "exact" else self.flops_poly

    @property
    def _m_text(self) -> str:
        return str(self.ms[0]) if len(set(self.ms)) == 1 else ",".join(map(str, self.ms))

    def __repr__(self) -> str:
        k = self.order
        cert = self.certificate
        lines = [
            f"  Spec:               {self.spec.name}  (order {k}, score {self.spec.score!r})",
            f"  Sizes:              n={self.n}  m={self._m_text}  D={self.D}  "
            f"e={self.E}  batch={self.Z}  causal={self.causal}",
            f"  Scale:              {self.scale:.6g}",
            f"  Entry bound B:      {self.B:.4f}   threshold tau_{k}(n) = (ln {max(self.n, *self.ms)})"
            f"^(1/{k}) = {self.threshold:.4f}  -> {self.verdict}",
            f"  Score radius beta:  {self.beta:.4f}",
        ]
        if cert is not None:
            lines += [
                f"  Polynomial:         {self.approximant} degree {cert.degree}, rank {cert.rank:,} "
                f"({cert.feature_dtype} features)",
                f"  Certified error:    {cert.output_error:.3e} * max|v|  (tol {self.tol:.1e}; "
                f"approximation {cert.approx_error:.2e}, roundoff {cert.roundoff:.2e})",
            ]
            if self.relative is not None:
                lines.append(f"  Toeplitz terms:     {self.relative.describe()}")
        else:
            lines.append(f"  Polynomial:         none certifies tol {self.tol:.1e} within max_degree "
                         f"{self.options.get('max_degree')}")
        lines.append(f"  Exact flops:        {_fmt_flops(self.flops_exact)}")
        if self.flops_poly is not None:
            lines.append(
                f"  Poly flops:         {_fmt_flops(self.flops_poly)}  "
                f"(exact/poly = {self.flops_exact / max(self.flops_poly, 1):.3g}x)"
            )
        lines.append(f"  Backend:            {self.backend}  ({self.reason})")
        return "Plan(\n" + "\n".join(lines) + "\n)"


def _bound_message(plan: Plan, what: str) -> str:
    k = plan.order
    cert = plan.certificate
    need = (
        f"a certified tol={plan.tol:g} needs degree {cert.degree}, rank {cert.rank:,}"
        if cert
        else f"no degree <= max_degree={plan.options.get('max_degree')} certifies tol={plan.tol:g}"
    )
    return (
        f"{what} for spec {plan.spec.name!r} (order {k}): entry bound B = {plan.B:.4g} is not below "
        f"the threshold tau_{k}(n) = (ln {max(plan.n, *plan.ms)})^(1/{k}) = {plan.threshold:.4g} "
        f"(beta = {plan.beta:.4g}); {need}. "
        + SETH_SENTENCE.format(k=k)
        + " Fix: use backend='exact' or 'auto', pass on_unbounded='fallback', or rescale q/k "
        f"(smaller scale or entries) so that B < {plan.threshold:.4g}."
    )


def make_plan(
    spec: Spec,
    *,
    n: int,
    ms: tuple[int, ...],
    D: int,
    value_dims: tuple[int, ...],
    E: int,
    Z: int,
    causal: bool,
    scale: float,
    tol: float,
    beta: float,
    B: float,
    vmax: float,
    backend: str,
    on_unbounded: str,
    options: dict[str, Any],
    input_dtype: str,
    need_grad: bool = False,
    backends: dict | None = None,
) -> Plan:
    """Decide everything about one call; raise BoundError / InputError with numbers when refused."""
    from ..backends import BACKENDS

    registry = backends if backends is not None else BACKENDS
    if backend != "auto" and backend not in registry:
        raise InputError(
            f"unknown backend {backend!r}; valid backends are "
            f"{closest_names(backend, ['auto', *registry])}"
        )
    if on_unbounded not in ON_UNBOUNDED:
        raise InputError(f"on_unbounded={on_unbounded!r} is not one of {ON_UNBOUNDED}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise InputError(f"tol={tol!r} must be a number in (0, 1): the certified max|out - exact| / max|v|")
    max_degree = int(options.get("max_degree", 40))
    max_rank = int(options.get("max_rank", 1 << 21))
    approx = get_approximant(options.get("approximant", "chebyshev"))
    n_max = max(n, *ms)
    tau = threshold(spec.order, n_max)
    passed = B < tau
    rel_terms, rel_note = None, ""
    overhead = POLY_OVERHEAD
    if spec.positional == "relative":  # FFT-Toeplitz path: terms over the support of W (DESIGN 5.4)
        W = options.get("rel")
        support = RelativeSupport.dense(D) if W is None else relative_support(W, D)
        cert, rel_terms, rel_note = choose_relative(
            approx, support, beta=beta, B=B, tol=tol, n=n, m=ms[0], Z=Z, E=E,
            q_offset=int(options.get("q_offset") or 0), alibi_slope=options.get("alibi_slope"),
            input_dtype=input_dtype, max_degree=max_degree, max_rank=max_rank, need_grad=need_grad,
        )
        flops_e = relative_exact_flops(Z, n, ms[0], D, E, causal)
        flops_p = rel_terms.flops if rel_terms else None
        overhead = RELATIVE_OVERHEAD
    else:
        cert = choose_certificate(
            approx, beta, tol, D, max(ms), spec.order, input_dtype=input_dtype,
            max_degree=max_degree, need_grad=need_grad,
        )
        flops_e = exact_flops(Z, n, ms, D, E, causal)
        flops_p = poly_flops(Z, n, ms, cert.rank, E, list(value_dims), causal) if cert else None
    base = dict(
        spec=spec, n=n, ms=ms, D=D, value_dims=value_dims, E=E, Z=Z, causal=causal, scale=scale,
        tol=tol, beta=beta, B=B, threshold=tau, passed=passed, certificate=cert,
        approximant=approx.name, flops_exact=flops_e, flops_poly=flops_p, vmax=vmax,
        options=options, requested=backend, relative=rel_terms,
    )
    poly_ok = spec.separable or "poly" in registry and getattr(registry["poly"], "supports_relative", False)

    if backend == "auto":
        if not poly_ok:
            return Plan(**base, backend="exact", reason=f"spec {spec.name!r} has no poly backend yet")
        if not passed:
            return Plan(**base, backend="exact", reason="B is past the threshold")
        if cert is None or cert.rank > max_rank:
            return Plan(**base, backend="exact", reason="no certified polynomial within max_degree/max_rank")
        if flops_p * overhead >= flops_e:
            return Plan(**base, backend="exact", reason="cost model: exact is cheaper at this size")
        return Plan(**base, backend="poly", reason="within bound and cheaper by the cost model")
    if backend != "poly":
        reason = "requested" if backend == "exact" else "requested baseline (no certificate)"
        return Plan(**base, backend=backend, reason=reason)

    if not poly_ok:
        raise InputError(
            f"backend='poly' does not support spec {spec.name!r} (positional={spec.positional!r}) "
            "yet; use backend='exact'"
        )
    plan = Plan(**base, backend="poly", reason="requested")
    if not passed:
        if on_unbounded == "raise":
            raise BoundError(_bound_message(plan, "backend='poly' refused"))
        if on_unbounded == "fallback":
            warnings.warn(_bound_message(plan, "falling back to exact"), BoundWarning, stacklevel=4)
            return replace(plan, backend="exact", reason="fallback: B past the threshold")
    if cert is None:
        raise BoundError(
            f"backend='poly' for spec {spec.name!r}: no polynomial of degree <= max_degree="
            f"{max_degree} certifies tol={tol:g} at beta={beta:.4g} (B={B:.4g}, tau={tau:.4g}). "
            + (f"For the relative FFT path {rel_note} " if rel_note else "")
            + "Fix: raise max_degree, loosen tol, or use backend='exact'"
        )
    if cert.rank > max_rank:
        raise BoundError(
            f"backend='poly' for spec {spec.name!r}: tol={tol:g} at beta={beta:.4g} needs degree "
            f"{cert.degree} and rank {cert.rank:,} (D={D}), above max_rank={max_rank:,}. Fix: raise "
            "max_rank, loosen tol, or use backend='exact'"
        )
    return plan


def plan(
    spec: str | Spec = "pairwise",
    *,
    n: int,
    d: int | None = None,
    bound: float | None = None,
    tol: float = 1e-3,
    m: int | None = None,
    e: int | None = None,
    sizes: dict[str, int] | None = None,
    scale: float | None = None,
    beta: float | None = None,
    causal: bool = False,
    batch: int = 1,
    backend: str = "auto",
    on_unbounded: str = "raise",
    dtype: str = "float32",
    **options: Any,
) -> Plan:
    """Plan a call from sizes and an entry bound, without data (compare opt_einsum.contract_path).

    ``bound`` is the largest absolute entry of q and the keys; ``beta`` may be given instead. For
    spec ``relative`` pass ``rel=W`` to plan with W's support and norm (else a dense W, ||W_t|| <= 1).

    >>> import tensorattn as ta
    >>> p = ta.plan("pairwise", n=65536, d=8, bound=1.0, scale=1/8, tol=1e-3)
    >>> p.backend, p.degree, p.rank
    ('poly', 5, 1287)
    """
    spec = get_spec(spec)
    if sizes is None:
        if d is None:
            raise InputError("plan() needs d= (size of every contracted index) or sizes={letter: size}")
        sizes = {c: d for c in spec.contracted}
    missing = [c for c in spec.contracted if c not in sizes]
    if missing:
        raise InputError(f"plan(): sizes has no entry for contracted index {missing[0]!r} of {spec.score!r}")
    D = spec.feature_dim(sizes)
    k = spec.order
    m = n if m is None else m
    e = (d or 1) if e is None else e
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if beta is None:
        if bound is None:
            raise InputError("plan() needs bound= (max |entry| of q and k) or beta= (score radius)")
        # relative: ||W_t||_2 <= 1 unless rel=W is given (then its largest operator norm)
        w = relative_support(options["rel"], D).wnorm if options.get("rel") is not None else 1.0
        beta = abs(scale) * D * bound**k * w
        B = (abs(scale) * D * bound**k * w) ** (1.0 / k)
    else:
        B = beta ** (1.0 / k) if bound is None else (abs(scale) * D * bound**k) ** (1.0 / k)
    opts = {"max_degree": 40, "max_rank": 1 << 21, "approximant": "chebyshev", **options}
    ve = spec.value_einsum
    value_dims = tuple(e ** len(letters) for letters in ve.value_letters)
    E = e ** len(ve.out_letters)
    vmax = 1.0
    return make_plan(
        spec, n=n, ms=(m,) * (k - 1), D=D, value_dims=value_dims, E=E, Z=batch, causal=causal,
        scale=scale, tol=tol, beta=beta, B=B, vmax=vmax, backend=backend,
        on_unbounded=on_unbounded, options=opts, input_dtype=dtype,
    )


def rank_needed(D: int, g: int | None) -> int | None:
    return None if g is None else rank_for(D, g)
