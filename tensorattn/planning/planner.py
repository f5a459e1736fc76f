"""The plan: bound check, degree choice, certificate, cost model and backend choice, in one report.

``make_plan(problem, request)`` decides everything about one call from its sizes and bound
statistics; ``plan_for(ops, request)`` does it for validated operands; ``plan(...)`` plans from
sizes and an entry bound alone, without data (compare ``opt_einsum.contract_path``). The planner
asks the registered backends whether they serve a problem; it never imports one.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Mapping

from .. import positional
from ..approx.polynomials import get_approximant
from ..checks import check_int, check_number, shorten
from ..errors import BoundError, InputError
from ..inputs import Operands, check_finite, check_positions, to_tensor
from ..registry import AUTO, Backend, backends_serving, registered, serving
from ..request import MAX_POSITION, Problem, Request, TermStats, default_scale
from ..spec import Spec, get_spec
from .bounds import OperandMaxima, problem_for, term_stats, threshold
from .certificate import (
    FLOAT32_SAFE_RANGE,
    FLOAT64_SAFE_RANGE,
    SUBNORMAL_ERROR,
    Certificate,
    PolynomialCertificate,
    cast_error,
    certify_degree,
    choose_certificate,
    choose_polynomial_certificate,
    exact_dtype,
    exact_error,
    numeric_range,
    rotation_error,
)
from .cost import DIRECT_OVERHEAD, POLY_OVERHEAD, direct_flops, exact_flops, poly_flops, polynomial_exact_flops
from .network import Network, build_networks, method_flops, poly_methods
from .relative import (
    RELATIVE_OVERHEAD,
    RelativeSupport,
    RelativeTerms,
    choose_relative,
    relative_exact_flops,
    relative_support,
)

#: the dtypes ta.plan accepts (those of the inputs)
PLAN_DTYPES = ("float16", "bfloat16", "float32", "float64")

SETH_SENTENCE = (
    "Past tau_k(n) = (ln n)^(1/k), no algorithm computes order-{k} attention in truly "
    "sub-n^{k} time under SETH (Alman & Song), so no low-rank polynomial can be both fast and "
    "accurate here."
)


class BoundWarning(UserWarning):
    """Emitted when on_unbounded='fallback' runs exact instead of poly."""


@dataclass(frozen=True)
class Plan:
    """How one attention call will be computed, and why. ``repr`` prints a human report."""

    problem: Problem
    request: Request
    threshold: float
    passed: bool
    certificate: Certificate | PolynomialCertificate | None
    flops_exact: int
    flops_poly: int | None
    backend: str
    reason: str
    #: the FFT-Toeplitz terms of the relative path (spec ``relative``), else None
    relative: RelativeTerms | None = None
    #: an attention polynomial's tensor network(s) under the polynomial method, else None
    networks: tuple[Network, ...] | None = None
    #: an attention polynomial's poly method: "network", "moments", "tree" or "triangle"
    poly_method: str | None = None
    #: spec ``relative`` with the same W at every offset and no ALiBi: W is folded into q and poly
    #: runs the pairwise path (s_ij = scale (q_i^T W) k_j)
    rel_folded: bool = False
    #: an attention polynomial's per-term thresholds, and the term whose B / tau decides the verdict
    term_thresholds: tuple[float, ...] = ()
    deciding_term: int | None = None
    #: how the pairwise-shaped factorized engine evaluates P: "factorized" (feature maps, O(n r e))
    #: or "direct" (P from the scores, O(n m (D + g + e)), cheaper for short sequences;
    #: docs/design.md#the-direct-form); None where neither applies
    poly_form: str | None = None

    # --- the problem and request, for reading convenience
    @property
    def spec(self) -> Spec:
        return self.problem.spec

    @property
    def order(self) -> int:
        return self.problem.order

    @property
    def n(self) -> int:
        return self.problem.n

    @property
    def ms(self) -> tuple[int, ...]:
        return self.problem.ms

    @property
    def D(self) -> int:
        return self.problem.D

    @property
    def E(self) -> int:
        return self.problem.E

    @property
    def beta(self) -> float:
        return self.problem.beta

    @property
    def B(self) -> float:
        return self.problem.B

    @property
    def vmax(self) -> float:
        return self.problem.vmax

    @property
    def scale(self) -> float:
        return self.problem.scale

    @property
    def causal(self) -> bool:
        return self.problem.causal

    @property
    def tol(self) -> float:
        return self.request.tol

    @property
    def approximant(self) -> str:
        return self.request.approximant

    # --- the decisions
    @property
    def degree(self) -> int | None:
        return self.certificate.degree if self.certificate else None

    @property
    def rank(self) -> int | None:
        return self.certificate.rank if self.certificate else None

    @property
    def threshold_order(self) -> int:
        """The k of the threshold tau_k(n) that decides the verdict (the deciding term's, for an
        attention polynomial)."""
        return self.problem.terms[self.deciding_term].order if self.deciding_term is not None else self.order

    @property
    def verdict(self) -> str:
        return "within bound" if self.passed else "past threshold"

    @property
    def exact_dtype(self) -> str:
        """The dtype the exact backend computes in (float64 when float32 could overflow)."""
        return exact_dtype(self.problem)

    @cached_property
    def unit_divisors(self) -> tuple[float, ...]:
        """A power of two near max |entry| of each score operand (1.0 for operands already near 1).

        A score is homogeneous in every operand, s = scale * <x_0, ..., x_{k-1}>, so dividing x_m by
        c_m and multiplying the scale by prod c_m changes only magnitudes: the polynomial features
        stay near 1 instead of overflowing (|x|^g) or underflowing, and no rounding is added. An
        attention polynomial is not homogeneous in each slot, so its operands stay as they are."""
        if self.problem.spec.is_polynomial:
            return (1.0,) * self.order
        return _powers_of_two(self.problem.linf or (1.0,) * self.order)

    @cached_property
    def value_divisors(self) -> tuple[float, ...]:
        """A power of two near max |entry| of each value operand (1.0 near 1). The result is linear
        in every value slot, so the backends run on values near 1 (no underflow in products of
        tiny values, no overflow of large ones) and the result is multiplied back exactly."""
        return _powers_of_two(self.problem.value_linf or (1.0,) * (self.order - 1))

    @property
    def compute_error(self) -> float | None:
        """Certified bound on max|out - exact| of the result in the dtype it is computed in (the
        feature dtype for poly): approximation and roundoff, before any cast, the RoPE rotation
        (spec ``rope``) and half a subnormal for the power-of-two rescaling of the values; None
        without a certificate."""
        if self.backend == "exact":
            err = exact_error(self.problem, self.exact_dtype) * self.vmax
        elif self.backend == "poly" and self.certificate is not None:
            err = self.certificate.output_error * self.vmax
        else:
            return None
        return err + rotation_error(self.problem) * self.vmax + SUBNORMAL_ERROR[self.problem.dtype]

    @property
    def cast_steps(self) -> tuple[str, ...]:
        """The dtypes the result passes through, from the one it is computed in to the caller's."""
        first = self.exact_dtype if self.backend == "exact" else (
            "float64" if self.relative is not None else self.certificate.feature_dtype)
        result = self.problem.result_dtype
        # a float64 result cast to a half dtype may be rounded to float32 on the way: count both
        via = ("float32",) if result in ("float16", "bfloat16") else ()
        return (first, self.problem.dtype, *via, result)

    @property
    def error_bound(self) -> float | None:
        """Certified bound on max|out - exact| for what the caller receives, exact being the
        attention of the inputs as given, in exact arithmetic: ``compute_error`` plus the rounding
        of every narrowing cast on the way to the caller's dtype (float64 -> float32, float32 ->
        float16 / bfloat16). None for backends without a certificate (docs/design.md#the-certificate)."""
        err = self.compute_error
        if err is None:
            return None
        return err + cast_error(self.vmax + err, self.cast_steps)

    @property
    def score_grad_bound(self) -> float | None:
        """Certified bound on max_i sum_tau |dL~/ds_i,tau - dL/ds_i,tau|, the error of the gradient
        w.r.t. the *scores*, per unit of max_i ||dO_i||_1 (docs/torch.md, G3). Data-free; the
        bounds for the gradients w.r.t. q, k, v are ``AttentionInfo.grad`` / ``ta.grad_bound_for``."""
        if self.backend == "exact":
            return 0.0
        if self.backend == "poly" and self.certificate is not None:
            return self.certificate.grad_factor * self.vmax
        return None

    @property
    def flops(self) -> int | None:
        return self.flops_exact if self.backend == "exact" else self.flops_poly

    def __repr__(self) -> str:
        p, k, cert = self.problem, self.threshold_order, self.certificate
        m_text = str(p.ms[0]) if len(set(p.ms)) == 1 else ",".join(map(str, p.ms))
        lines = [
            f"  Spec:               {p.spec.name}  (order {self.order}, score {p.spec.score!r})",
            f"  Sizes:              n={p.n}  m={m_text}  D={p.D}  e={p.E}  batch={p.Z}  causal={p.causal}",
            *([f"  Masks:              {_mask_text(p)}"] if p.key_mask or p.attn_mask else []),
            f"  Scale:              {p.scale:.6g}",
            f"  Entry bound B:      {p.B:.4f}   threshold tau_{k}(n) = (ln {p.n_max})^(1/{k}) = "
            f"{self.threshold:.4f}  -> {self.verdict}",
            f"  Score radius beta:  {p.beta:.4f}",
        ]
        if p.terms:
            for t, (term, st, tau) in enumerate(zip(p.spec.terms, p.terms, self.term_thresholds)):
                deg = f", degree {cert.terms[t].degree}, rank {cert.terms[t].rank:,}" if cert is not None else ""
                mark = "  <- decides" if t == self.deciding_term else ""
                lines.append(f"  Term {t}:             {term.expr!r} (order {st.order}): B = {st.B:.4f} vs tau = "
                             f"{tau:.4f}, beta = {st.beta:.4f}{deg}{mark}")
        if isinstance(cert, PolynomialCertificate):
            lines += [
                f"  Polynomials:        {self.approximant}, degrees {', '.join(map(str, cert.degrees))}; ranks "
                f"{', '.join(f'{r:,}' for r in cert.ranks)} ({cert.feature_dtype} features)",
                f"  Certified error:    {cert.output_error:.3e} * max|v|  (tol {self.tol:.1e}; weights within "
                f"{cert.weight_error:.2e}, roundoff {cert.roundoff:.2e})",
            ]
            lines.append(f"  Poly method:        {self.poly_method}")
            for net in self.networks or ():
                lines.append(f"  Network:            {net.description}")
        elif cert is not None:
            lines += [
                f"  Polynomial:         {self.approximant} degree {cert.degree}, rank {cert.rank:,} "
                f"({cert.feature_dtype} features)",
                f"  Certified error:    {cert.output_error:.3e} * max|v|  (tol {self.tol:.1e}; "
                f"approximation {cert.approx_error:.2e}, roundoff {cert.roundoff:.2e})",
            ]
            if self.relative is not None:
                lines.append(f"  Toeplitz terms:     {self.relative.describe()}")
            if self.poly_form == "direct":
                lines.append("  Form:               direct (P from the scores: cheaper than features at this size)")
        elif self.request.backend in (AUTO, "poly"):
            lines.append(f"  Polynomial:         none certifies tol {self.tol:.1e} within max_degree "
                         f"{self.request.max_degree}")
        if self.rel_folded:
            lines.append("  Relative W:         the same matrix at every offset: folded into q, pairwise path")
        bound = self.error_bound
        cast = 0.0 if bound is None else bound - (self.compute_error or 0.0)
        if bound is not None and self.vmax > 0 and (self.backend != "poly" or cast > 0):
            lines.append(f"  Error bound:        {bound / self.vmax:.3e} * max|v| for {self.backend}'s "
                         f"{p.result_dtype} result" + (f" (of which {cast / self.vmax:.2e} the cast "
                                                       f"{' -> '.join(dict.fromkeys(self.cast_steps))})"
                                                       if cast > 0 else ""))
        lines.append(f"  Exact flops:        {self.flops_exact:.3e}")
        if self.flops_poly is not None:
            lines.append(
                f"  Poly flops:         {self.flops_poly:.3e}  "
                f"(exact/poly = {self.flops_exact / max(self.flops_poly, 1):.3g}x)"
            )
        lines.append(f"  Backend:            {self.backend}  ({self.reason})")
        return "Plan(\n" + "\n".join(lines) + "\n)"


def _mask_text(p: Problem) -> str:
    parts = [f"key mask ({p.key_mask})"] if p.key_mask else []
    return ", ".join(parts + (["general attn_mask"] if p.attn_mask else []))


def _bound_message(plan: Plan, what: str) -> str:
    k = plan.threshold_order
    cert = plan.certificate
    need = (
        f"a certified tol={plan.tol:g} needs degree {cert.degree}, rank {cert.rank:,}"
        if cert
        else f"no degree <= max_degree={plan.request.max_degree} certifies tol={plan.tol:g}"
    )
    t = plan.deciding_term
    term = "" if t is None else f" term {t} ({plan.spec.terms[t].expr!r})"
    return (
        f"{what} for spec {plan.spec.name!r}{term} (order {k}): entry bound B = {plan.B:.4g} is not below "
        f"the threshold tau_{k}(n) = (ln {plan.problem.n_max})^(1/{k}) = {plan.threshold:.4g} "
        f"(beta = {plan.beta:.4g}); {need}. "
        + SETH_SENTENCE.format(k=k)
        + " Fix: use backend='exact' or 'auto', pass on_unbounded='fallback', or rescale q/k "
        f"(smaller scale or entries) so that B < {plan.threshold:.4g}."
    )


def _rel_folded(problem: Problem) -> bool:
    """One W at every offset and no ALiBi: s_ij = scale (q_i^T W) k_j is pairwise attention on q W.
    Not while gradients are taken, since each offset's W_t then has its own gradient."""
    rel = problem.relative
    return (problem.spec.positional == "relative" and rel is not None and rel.constant and not problem.alibi_slope
            and not problem.need_grad)


def _direct_applies(problem: Problem) -> bool:
    """The direct form serves non-causal order-2 calls whose value einsum passes values through."""
    ve = problem.spec.value_einsum
    return (problem.order == 2 and not problem.causal and problem.q_offset == 0
            and tuple(ve.value_letters) == (ve.out_letters,))


def _poly_certificate(problem: Problem, request: Request) -> tuple[Any, Any, str]:
    """The certificate (and, for spec ``relative``, the Toeplitz terms; for an attention
    polynomial, the tensor networks) poly would run with."""
    approx = get_approximant(request.approximant)
    if problem.spec.is_polynomial:
        cert = choose_polynomial_certificate(
            approx, problem.terms, request.tol, max(problem.ms), input_dtype=problem.dtype,
            max_degree=request.max_degree, feature_dtype=request.feature_dtype, degree=request.degree,
        )
        if cert is None or cert.rank > request.max_rank:
            return cert, None, ""
        shapes = problem.value_shapes or tuple((e,) for e in problem.value_dims)
        return cert, build_networks(problem.spec, problem.Z, problem.n, problem.ms, cert.ranks, shapes), ""
    if problem.spec.positional == "relative" and not _rel_folded(problem):
        # FFT-Toeplitz path: terms over the support of W (one W at every offset is folded into q)
        support = problem.relative if problem.relative is not None else RelativeSupport.dense(problem.D)
        return choose_relative(
            approx, support, beta=problem.beta, B=problem.B, tol=request.tol, n=problem.n, m=problem.ms[0],
            Z=problem.Z, E=problem.E, q_offset=problem.q_offset, alibi_slope=problem.alibi_slope,
            input_dtype=problem.dtype, max_degree=request.max_degree, max_rank=request.max_rank,
            need_grad=problem.need_grad, degree=request.degree,
        )
    m = max(problem.ms)
    # float32 statistics U^T [v | 1] would overflow on values this large: float64 features
    wide = problem.vmax * m > FLOAT32_SAFE_RANGE
    feature_dtype = request.feature_dtype or ("float64" if wide else None)
    if request.degree is not None:
        cert = certify_degree(approx, problem.beta, request.degree, problem.D, m, problem.order,
                              input_dtype=problem.dtype, feature_dtype=feature_dtype)
    else:
        cert = choose_certificate(approx, problem.beta, request.tol, problem.D, m, problem.order,
                                  input_dtype=problem.dtype, max_degree=request.max_degree,
                                  need_grad=problem.need_grad, feature_dtype=feature_dtype)
    return cert, None, ""


def make_plan(problem: Problem, request: Request, backends: dict[str, Backend] | None = None) -> Plan:
    """Decide everything about one call; raise BoundError / InputError with numbers when refused."""
    return _check_range(_decide(problem, request, registered() if backends is None else backends))


def _check_range(plan: Plan) -> Plan:
    """Refuse, with the numbers, a call whose scores or value sums may not fit in float64: no backend
    could return a finite, right answer (past float32's range exact computes in float64)."""
    p = plan.problem
    values = p.vmax * math.prod(p.ms)
    scores = numeric_range(p) if plan.backend in ("exact", "sdpa") else 0.0
    if max(values, scores) > FLOAT64_SAFE_RANGE:
        what = (f"the values (max |value of a key tuple| = {p.vmax:.3g}, summed over {math.prod(p.ms):,} key tuples)"
                if values > FLOAT64_SAFE_RANGE else
                f"the score contraction (max |entry| of q and the keys = {', '.join(f'{x:.3g}' for x in p.linf)}, "
                f"scale = {p.scale:.3g}, score radius beta = {p.beta:.3g})")
        raise InputError(
            f"spec {p.spec.name!r}: {what} may exceed float64's range (about 1.8e308), so backend "
            f"{plan.backend!r} cannot return a finite, correct result. Fix: rescale the inputs (or the scale) "
            "toward magnitude 1"
        )
    return plan


def _decide(problem: Problem, request: Request, registry: dict[str, Backend]) -> Plan:
    spec = problem.spec
    tau = threshold(spec.order, problem.n_max)
    passed = problem.B < tau
    term_taus, deciding = (), None
    if problem.terms:  # an attention polynomial: a threshold per term, the tightest decides
        term_taus = tuple(threshold(t.order, problem.n_max) for t in problem.terms)
        ratios = [t.B / tau_t if tau_t > 0 else math.inf for t, tau_t in zip(problem.terms, term_taus)]
        deciding = max(range(len(ratios)), key=ratios.__getitem__)
        tau = term_taus[deciding]
        passed = all(t.B < tau_t for t, tau_t in zip(problem.terms, term_taus))
    poly = registry.get("poly")
    poly_serves = serving(poly, spec, problem) if poly is not None else False
    # a named backend other than poly never needs the polynomial: skip its certificate and cost
    wants_poly = request.backend in (AUTO, "poly")
    cert, extra, rel_note = _poly_certificate(problem, request) if poly_serves and wants_poly else (None, None, "")
    folded = _rel_folded(problem)
    rel_terms = extra if spec.positional == "relative" and not folded else None
    networks = extra if spec.is_polynomial else None
    method = form = None
    if spec.is_polynomial:
        flops_e = polynomial_exact_flops(spec, problem.Z, problem.n, problem.ms,
                                         tuple(t.D for t in problem.terms), problem.E, problem.causal)
        flops_p = None
        methods = poly_methods(spec, problem.causal) if networks else []
        if methods:
            costs = {m: method_flops(m, spec, problem.Z, (problem.n, *problem.ms), cert.degrees, cert.ranks,
                                     problem.E, networks, problem.D) for m in methods}
            method = min(costs, key=costs.__getitem__)
            flops_p = int(2 * costs[method])
        if method != "network":
            networks = None
        overhead = POLY_OVERHEAD
    elif spec.positional == "relative" and not folded:
        flops_e = relative_exact_flops(problem.Z, problem.n, problem.ms[0], problem.D, problem.E, problem.causal)
        flops_p = rel_terms.flops if rel_terms else None
        overhead = RELATIVE_OVERHEAD
    else:
        flops_e = exact_flops(problem.Z, problem.n, problem.ms, problem.D, problem.E, problem.causal)
        flops_p = (poly_flops(problem.Z, problem.n, problem.ms, cert.rank, problem.E, list(problem.value_dims),
                              problem.causal) if cert else None)
        overhead = POLY_OVERHEAD
        if cert is not None:
            form = "factorized"
            if _direct_applies(problem) and cert.direct_ok:
                flops_d = direct_flops(problem.Z, problem.n, problem.ms[0], problem.D, problem.E, cert.degree)
                if flops_d * DIRECT_OVERHEAD < flops_p:
                    form, flops_p = "direct", flops_d
    base = dict(problem=problem, request=request, threshold=tau, passed=passed, certificate=cert,
                flops_exact=flops_e, flops_poly=flops_p, relative=rel_terms, networks=networks,
                term_thresholds=term_taus, deciding_term=deciding, rel_folded=folded, poly_method=method,
                poly_form=form)
    backend = request.backend

    if backend == AUTO:
        if not poly_serves:
            why = getattr(poly_serves, "reason", "no poly backend is registered")
            what = "this call" if problem.key_mask or problem.attn_mask else f"spec {spec.name!r}"
            return Plan(**base, backend="exact", reason=f"poly does not serve {what}: {why}")
        if not passed:
            return Plan(**base, backend="exact", reason="B is past the threshold")
        if cert is None or cert.rank > request.max_rank:
            return Plan(**base, backend="exact", reason="no certified polynomial within max_degree/max_rank")
        if flops_p * overhead >= flops_e:
            return Plan(**base, backend="exact", reason="cost model: exact is cheaper at this size")
        return Plan(**base, backend="poly", reason="within bound and cheaper by the cost model")

    impl = registry.get(backend)
    if impl is None:
        raise InputError(f"backend {backend!r} is not in the registry this plan was made with: {sorted(registry)}")
    serves = poly_serves if backend == "poly" and poly is impl else serving(impl, spec, problem)
    if not serves:
        others = ", ".join(repr(n) for n in backends_serving(spec, problem, registry))
        what = "this masked call to spec" if problem.key_mask or problem.attn_mask else "spec"
        raise InputError(
            f"backend={backend!r} cannot serve {what} {spec.name!r} (order {spec.order}, score {spec.score!r}"
            f"{', positional=' + repr(spec.positional) if spec.positional else ''}): {serves.reason}. "
            f"Backends that can: {others}"
        )
    if backend != "poly":
        reason = "requested" if impl.certified else "requested baseline (no certificate)"
        return Plan(**base, backend=backend, reason=reason)

    plan = Plan(**base, backend="poly", reason="requested" if request.degree is None
                else f"degree pinned to {request.degree}")
    if not passed:
        if request.on_unbounded == "raise":
            raise BoundError(_bound_message(plan, "backend='poly' refused"))
        if request.on_unbounded == "fallback":
            warnings.warn(_bound_message(plan, "falling back to exact"), BoundWarning, stacklevel=5)
            return replace(plan, backend="exact", reason="fallback: B past the threshold")
    if cert is None:
        raise BoundError(
            f"backend='poly' for spec {spec.name!r}: no polynomial of degree <= max_degree="
            f"{request.max_degree} certifies tol={request.tol:g} at beta={problem.beta:.4g} (B={problem.B:.4g}, "
            f"tau={tau:.4g}). "
            + (f"For the relative FFT path {rel_note} " if rel_note else "")
            + "Fix: raise max_degree, loosen tol, or use backend='exact'"
        )
    if cert.rank > request.max_rank:
        raise BoundError(
            f"backend='poly' for spec {spec.name!r}: tol={request.tol:g} at beta={problem.beta:.4g} needs degree "
            f"{cert.degree} and rank {cert.rank:,} (D={problem.D}), above max_rank={request.max_rank:,}. Fix: "
            "raise max_rank, loosen tol, or use backend='exact'"
        )
    return plan


#: plans of recent calls, by (Problem, Request, registry): a Problem holds every number a plan is
#: computed from (sizes, beta, B, vmax, dtype ...), so a hit is the plan make_plan would return
_PLANS: OrderedDict = OrderedDict()
PLAN_CACHE_SIZE = 256


def cached_plan(problem: Problem, request: Request) -> Plan:
    """``make_plan(problem, request)``, reused when the same problem comes again (a model called on
    the same batch, a benchmark loop). Calls that warn (on_unbounded='fallback') are not cached, so
    every such call warns."""
    if request.on_unbounded == "fallback":
        return make_plan(problem, request)
    registry = registered()
    try:
        key = (problem, request, tuple(registry.items()))
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable spec option
        return make_plan(problem, request)
    if plan is None:
        plan = make_plan(problem, request)
        _PLANS[key] = plan
        if len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def plan_for(ops: Operands, request: Request, *, maxima: OperandMaxima | None = None, n: int | None = None,
             ms: tuple[int, ...] | None = None) -> Plan:
    """The plan for validated operands. A sequence-parallel caller passes the global operand
    ``maxima`` and sizes ``n``, ``ms``, so that every shard plans the whole sequence."""
    return cached_plan(problem_for(ops, request, maxima=maxima, n=n, ms=ms), request)


def _powers_of_two(maxima: tuple[float, ...]) -> tuple[float, ...]:
    """2^floor(log2 x) for every max |entry| x, or all 1.0 when each is 0 or within [2^-16, 2^16]."""
    if all(x == 0.0 or 2.0 ** -16 <= x <= 2.0 ** 16 for x in maxima):
        return (1.0,) * len(maxima)
    return tuple(2.0 ** math.floor(math.log2(x)) if x > 0 else 1.0 for x in maxima)


def _power(x: float, k: int) -> float:
    """x ** k, inf when it overflows (the plan then refuses with the numbers instead of crashing)."""
    try:
        return x**k
    except OverflowError:
        return math.inf


def plan(
    spec: str | Spec = "pairwise",
    *,
    n: int,
    d: int | None = None,
    bound: float | None = None,
    m: int | None = None,
    e: int | None = None,
    sizes: dict[str, int] | None = None,
    beta: float | None = None,
    batch: int = 1,
    dtype: str = "float32",
    **options: Any,
) -> Plan:
    """Plan a call from sizes and an entry bound, without data (compare opt_einsum.contract_path).

    ``bound`` is the largest absolute entry of q and the keys; ``beta`` (the score radius) may be
    given instead. Every other keyword is a ``Request`` setting (``tol``, ``scale``, ``causal``,
    ``backend``, ``max_degree`` ...) or a spec option; for spec ``relative`` pass ``rel=W`` to plan
    with W's support and norm (else a dense W with ||W_t|| <= 1).

    >>> import tensorattn as ta
    >>> p = ta.plan("pairwise", n=65536, d=8, bound=1.0, scale=1/8, tol=1e-3)
    >>> p.backend, p.degree, p.rank
    ('poly', 5, 1287)
    """
    spec = get_spec(spec)
    request, spec_options = Request.from_call(spec, **options)
    spec_options = positional.check_options(spec.positional, spec_options)
    n = check_int("n", n, low=1, high=MAX_POSITION, hint="the number of queries")
    m = n if m is None else check_int("m", m, low=1, high=MAX_POSITION, hint="the number of keys per slot")
    if d is not None:
        d = check_int("d", d, low=1, high=MAX_POSITION, hint="the size of every contracted index")
    if sizes is None:
        if d is None:
            raise InputError("plan() needs d= (size of every contracted index) or sizes={letter: size}")
        sizes = {c: d for c in spec.contracted}
    if not isinstance(sizes, Mapping):
        raise InputError(f"sizes={shorten(repr(sizes))} must be a dict {{index letter: size}}, e.g. {{'d': 8}}")
    missing = [c for c in spec.contracted if c not in sizes]
    if missing:
        raise InputError(f"plan(): sizes has no entry for contracted index {missing[0]!r} of {spec.score!r}")
    sizes = {c: check_int(f"sizes[{c!r}]", s, low=1, high=MAX_POSITION) for c, s in sizes.items()}
    e = (d or 1) if e is None else check_int("e", e, low=0, high=MAX_POSITION, hint="the value size")
    batch = check_int("batch", batch, low=1, high=MAX_POSITION)
    dtype_name = str(dtype).rsplit(".", 1)[-1] if not isinstance(dtype, str) else dtype
    if dtype_name not in PLAN_DTYPES:
        raise InputError(f"dtype={shorten(repr(dtype))} must be one of {', '.join(map(repr, PLAN_DTYPES))} (the "
                         "dtype of the inputs; float16 and bfloat16 are computed in float32)")
    check_positions(n, (m,) * (spec.order - 1), request.causal, request.q_offset)
    D = spec.feature_dim(sizes)
    k = spec.order
    scale = default_scale(D) if request.scale is None else request.scale
    W = spec_options.get("rel")
    support = None
    if W is not None:
        Wt = to_tensor(W, "rel")[0]
        check_finite(Wt, "rel")
        support = relative_support(Wt, D)
    terms: tuple = ()
    if spec.is_polynomial:
        if bound is None:
            raise InputError(
                f"plan() for the attention polynomial {spec.name!r} needs bound= (max |entry| of q and the keys): "
                "each term's radius beta_t and entry bound B_t come from it, which one beta= cannot give"
            )
        bound = check_number("bound", bound, low=0.0, hint="the largest |entry| of q and the keys")
        terms = _bound_term_stats(spec, sizes, abs(scale), bound, max(n, m))
        beta = sum(t.beta for t in terms)
        B = max(terms, key=lambda t: t.B / threshold(t.order, max(n, m)) if max(n, m) > 1 else t.B).B
    elif beta is None:
        if bound is None:
            raise InputError("plan() needs bound= (max |entry| of q and k) or beta= (score radius)")
        bound = check_number("bound", bound, low=0.0, hint="the largest |entry| of q and the keys")
        w = support.wnorm if support is not None else 1.0  # relative: ||W_t||_2 <= 1 unless W is given
        beta = abs(scale) * D * _power(bound, k) * w
        B = beta ** (1.0 / k)
    else:
        beta = check_number("beta", beta, low=0.0, hint="the score radius max|s|")
        if bound is None:
            B = beta ** (1.0 / k)
        else:
            bound = check_number("bound", bound, low=0.0, hint="the largest |entry| of q and the keys")
            B = (abs(scale) * D * _power(bound, k)) ** (1.0 / k)
    ve = spec.value_einsum
    value_dims = tuple(e ** len(letters) for letters in ve.value_letters)
    problem = Problem(
        spec=spec, n=n, ms=(m,) * (k - 1), D=D, value_dims=value_dims, E=e ** len(ve.out_letters),
        beta=beta, B=B, scale=scale, Z=batch, causal=request.causal, vmax=1.0,
        dtype="float64" if dtype_name == "float64" else "float32", out_dtype=dtype_name,
        need_grad=bool(request.need_grad), q_offset=request.q_offset or 0, relative=support,
        alibi_slope=float(spec_options.get("alibi_slope") or 0.0), terms=terms,
        linf=(bound,) * k if bound is not None else (),
    )
    return make_plan(problem, request)


def _bound_term_stats(spec: Spec, sizes: dict[str, int], scale: float, bound: float,
                      n_max: int) -> tuple[TermStats, ...]:
    """Each term's statistics when every entry of q and the keys is at most ``bound``: an operand
    expanded to the term's D_t index tuples has l2 norm <= bound sqrt(D_t), so term_stats gives
    beta_t = B_t^{k_t} = |c_t| scale D_t bound^{k_t} (the data path's bounds at these maxima)."""
    l2, linf = [], []
    for term in spec.terms:
        D_t = math.prod(sizes[c] for c in term.contracted)
        l2 += [bound * math.sqrt(D_t)] * term.order
        linf += [bound] * term.order
    return term_stats(spec, scale, sizes, OperandMaxima(tuple(l2), tuple(linf), (), 1.0))
