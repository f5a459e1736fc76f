"""The user-facing functions: attention(), check_bounds() and grad_bound_for(). They compute
nothing themselves: Spec + Request -> Operands (validation) -> Plan -> Backend -> result
(+ AttentionInfo); docs/design.md#from-a-call-to-a-result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .inputs import Operands, prepare
from .planning import GradientBound, Plan, certify_gradients, operand_maxima, plan_for
from .registry import registered
from .request import Request, with_call_signature
from .spec import Spec, get_spec


@dataclass(frozen=True)
class AttentionInfo:
    """What one call did: backend, degree/rank, bounds and the certified error."""

    backend: str
    spec: str
    order: int
    degree: int | None
    rank: int | None
    beta: float
    B: float
    threshold: float
    error_bound: float | None
    grad_error_bound: float | None
    flops: int | None
    flops_exact: int
    flops_poly: int | None
    passed: bool
    feature_dtype: str | None
    plan: Plan
    #: per-input gradient bounds (docs/torch.md); ``grad_error_bound`` is their max per unit dO
    grad: GradientBound | None = None

    @classmethod
    def from_plan(cls, plan: Plan, grad: GradientBound | None = None) -> "AttentionInfo":
        """``grad_error_bound`` bounds, per unit of max_i ||dO_i||_1, every input's gradient error
        (``grad`` has the per-input numbers); without ``grad`` it is 0.0 for exact, else None."""
        cert = plan.certificate if plan.backend == "poly" else None
        gbound = grad.unit if grad is not None else (0.0 if plan.backend == "exact" else None)
        return cls(
            backend=plan.backend, spec=plan.spec.name, order=plan.order,
            degree=cert.degree if cert else None, rank=cert.rank if cert else None,
            beta=plan.beta, B=plan.B, threshold=plan.threshold, error_bound=plan.error_bound,
            grad_error_bound=gbound, flops=plan.flops,
            flops_exact=plan.flops_exact, flops_poly=plan.flops_poly, passed=plan.passed,
            feature_dtype=cert.feature_dtype if cert else None, plan=plan, grad=grad,
        )

    def __repr__(self) -> str:
        eb = "n/a" if self.error_bound is None else f"{self.error_bound:.3e}"
        return (
            f"AttentionInfo(backend={self.backend!r}, spec={self.spec!r}, order={self.order}, "
            f"degree={self.degree}, rank={self.rank}, beta={self.beta:.4g}, B={self.B:.4g}, "
            f"threshold={self.threshold:.4g}, error_bound={eb}, flops={self.flops})"
        )


def run_plan(plan: Plan, ops: Operands) -> torch.Tensor:
    """Run the backend the plan chose on validated operands: (Z, n, *values) in the compute dtype."""
    if ops.n == 0 or ops.q.shape[0] == 0:
        return ops.q.new_zeros(ops.q.shape[0], ops.n, *ops.out_value_shape)
    return registered()[plan.backend].run(plan, ops)


def attend(spec: Spec, q: Any, k: Any, v: Any, request: Request, spec_options: Mapping[str, Any] | None = None,
           *, return_info: bool = False):
    """``attention`` for a resolved spec and a validated Request (the nn modules call this)."""
    ops = prepare(spec, q, k, v, request, dict(spec_options or {}))
    maxima = operand_maxima(ops)  # the bounds and the gradient certificate share one pass over the inputs
    plan = plan_for(ops, request, maxima=maxima)
    result = ops.restore(run_plan(plan, ops))
    if return_info:
        return result, AttentionInfo.from_plan(plan, certify_gradients(plan, ops, maxima))
    return result


@with_call_signature()
def attention(q: Any, k: Any, v: Any, *, spec: str | Spec = "pairwise", return_info: bool = False, **options: Any):
    """Generalized attention: ``out_i = sum over key tuples of softmax(score) * value``.

    ``q`` is ``(..., n, d)``; for order-2 specs ``k`` is ``(..., m, d)`` and ``v`` is ``(..., m, e)``,
    for order-k specs they are sequences of k-1 arrays. The result has the array type, dtype,
    device and leading dims of ``q``. ``backend`` is ``"auto"``, ``"exact"``, ``"poly"`` or a
    registered baseline; poly certifies ``max|out - exact| <= tol * max|v|``. The keywords are the
    ``Request`` settings (``backend``, ``tol``, ``causal``, ``scale``, ``on_unbounded``,
    ``max_degree``, ``q_offset`` ...; see ``ta.Request`` for each one and its default) and the
    spec's own options (``rope_base``, ``rel`` ...). See docs/index.md and docs/design.md.

    >>> import numpy as np, tensorattn as ta
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.uniform(-1, 1, (2, 128, 8)).astype("float32") for _ in range(3))
    >>> out, info = ta.attention(q, k, v, backend="poly", scale=1/8, return_info=True)
    >>> out.shape, out.dtype, info.backend, info.degree
    ((2, 128, 8), dtype('float32'), 'poly', 4)
    >>> exact = ta.attention(q, k, v, backend="exact", scale=1/8)
    >>> bool(np.abs(out - exact).max() <= info.error_bound)
    True
    """
    spec_obj = get_spec(spec)
    request, spec_options = Request.from_call(spec_obj, **options)
    return attend(spec_obj, q, k, v, request, spec_options, return_info=return_info)


def grad_bound_for(info: AttentionInfo, d_out: Any, *, by_input: bool = False) -> float | dict[str, float] | None:
    """Certified bound on the gradient error of one call for the upstream gradient ``d_out``.

    For ``out.backward(d_out)``, bounds the l2 norm of the gradient error of every token (hence
    every entry: max |grad_poly - grad_exact|) w.r.t. q, the keys and the values; per input with
    ``by_input=True``. It is at most ``info.grad_error_bound * max_i ||d_out_i||_1``; the derivation
    is in docs/torch.md. Gradients w.r.t. ``rel`` (W) are not covered, nor the rounding of a cast
    back to fp16/bf16. Returns None where the backend has no certificate.
    """
    if info.grad is None:
        return None
    t = torch.as_tensor(np.asarray(d_out) if not isinstance(d_out, torch.Tensor) else d_out).detach()
    t = t.to(torch.float64).abs()
    lead = t.ndim - len(info.plan.spec.value_einsum.out_letters)  # rows dO_i: one per query token
    l1 = float(t.reshape(*t.shape[:lead], -1).sum(-1).max()) if t.numel() else 0.0
    bounds = info.grad.for_upstream(l1, float(t.max()) if t.numel() else 0.0)
    return bounds if by_input else max(bounds.values())


@with_call_signature()
def check_bounds(q: Any, k: Any, v: Any = None, *, spec: str | Spec = "pairwise", **options: Any) -> Plan:
    """The bound check on real inputs: B, tau_k(n), beta, the degree and rank that poly needs for
    ``tol``, flops of exact vs poly, and the verdict (``plan.passed``). Returns the Plan that
    ``backend="auto"`` would run; keywords are as in ``attention``."""
    spec_obj = get_spec(spec)
    request, spec_options = Request.from_call(spec_obj, **options)
    if v is None:
        # the check needs no values: plan with unit values under the default value einsum
        spec_obj = Spec(spec_obj.name, spec_obj.score, positional=spec_obj.positional, options=spec_obj.options,
                        coefficients=spec_obj.coefficients, block_sizes=spec_obj.block_sizes)
        keys = list(k) if spec_obj.order > 2 else [k]
        v = [torch.ones(*tuple(np.shape(x))[: np.ndim(x) - len(f)], 1)
             for x, f in zip(keys, spec_obj.slots.features[1:])]
        v = v[0] if spec_obj.order == 2 else v
    return plan_for(prepare(spec_obj, q, k, v, request, spec_options), request)
