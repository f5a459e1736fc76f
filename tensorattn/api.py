"""The user-facing functions: attention(), check_bounds() and grad_bound_for(). They compute
nothing themselves: Spec + Request -> Operands (validation) -> Plan -> Backend -> result
(+ AttentionInfo); docs/design.md#from-a-call-to-a-result."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .checks import check_bool
from .errors import InputError
from .inputs import (
    Operands,
    all_finite,
    as_list,
    check_finite,
    full_precision,
    precision_reduced,
    prepare,
    to_tensor,
)
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


def gradient_overflows(grad: torch.Tensor | None) -> bool:
    """Whether ``grad`` has a non-finite entry."""
    return grad is not None and not all_finite(grad)


def gradient_overflow_error(backend: str, dtype: torch.dtype, where: str) -> InputError:
    """The error ``backward()`` raises for a gradient that overflowed (``where``: which one)."""
    return InputError(
        f"backend={backend!r}: {where} overflowed {dtype}'s largest finite number ({torch.finfo(dtype).max:.4g}) "
        "at these inputs although the output is finite (values near that size scale every gradient, and large "
        "scores make softmax a hard argmax whose gradient is ill-conditioned). Fix: rescale the values, q and the "
        "keys (or the scale) toward magnitude 1, or use float64"
    )


def _guard_gradients(ops: Operands, backend: str) -> None:
    """Make a non-finite gradient an InputError raised from ``backward()``: at extreme magnitudes
    (scores far past any useful range) a gradient may overflow although the output did not."""
    def check(grad: torch.Tensor | None) -> torch.Tensor | None:
        if gradient_overflows(grad):
            raise gradient_overflow_error(backend, grad.dtype, f"a gradient of shape {tuple(grad.shape)}")
        return grad

    if ops.tracks_grad:
        for t in ops.tensors:
            if t.requires_grad:
                t.register_hook(check)


def run_plan(plan: Plan, ops: Operands) -> torch.Tensor:
    """Run the backend the plan chose on validated operands: (Z, n, *values) in the compute dtype.

    With no query, no batch entry, or an empty value operand (a value index of size 0: the output
    is empty, or sums over nothing) the result is zeros of the right shape for every backend."""
    if ops.n == 0 or ops.q.shape[0] == 0 or any(v.numel() == 0 for v in ops.values):
        out = ops.q.new_zeros(ops.q.shape[0], ops.n, *ops.out_value_shape)
        if ops.tracks_grad:  # keep the result in the graph: every input gets a zero gradient
            out = out + sum(t.sum() for t in ops.tensors if t.requires_grad) * 0.0
        return out
    backend = registered()[plan.backend]
    _guard_gradients(ops, plan.backend)
    out = on_unit_values(plan, ops, lambda unit: backend.run(plan, unit))
    return out if backend.precise_backward else planned_backward(out, ops)


def planned_backward(out: torch.Tensor, ops: Operands) -> torch.Tensor:
    """``out``, whose backward runs in the planned dtypes also inside a ``torch.autocast`` region
    (``_PlannedBackward``); ``out`` itself when autograd does not record the call."""
    if not ops.tracks_grad:
        return out
    return _PlannedBackward.apply(out, *[t for t in ops.tensors if t.requires_grad])


class _PlannedBackward(torch.autograd.Function):
    """The identity on a backend's output. Autograd runs a graph's backward with the autocast
    state of the thread that calls ``backward()`` and the float32 matmul precision of the moment:
    inside a ``torch.autocast`` region it would run poly's recorded matrix products in
    float16/bfloat16 (under a reduced matmul precision, in TF32), past the gradient certificate.
    Where neither applies this node passes the gradient on (no cost); where one does, it
    differentiates the backend's graph itself under ``full_precision`` (a nested
    ``torch.autograd.grad``, which keeps double backward) and hands the engine no gradient for
    that graph."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out, *operands)
        # a copy, not a view: the caller may modify the result in place (out += x), as without this node
        return out.clone()

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        out, *operands = ctx.saved_tensors
        if not precision_reduced(d_out.device):
            return (d_out, *[None] * len(operands))
        with full_precision(d_out.device):
            # retained: the engine may be asked to run this graph again (retain_graph=True)
            grads = torch.autograd.grad(out, operands, d_out, retain_graph=True,
                                        create_graph=torch.is_grad_enabled(), allow_unused=True)
        return (None, *grads)


def on_unit_values(plan: Plan, ops: Operands, run: Callable[[Operands], torch.Tensor]) -> torch.Tensor:
    """``run(ops)`` as every frontend calls a backend: for values far from 1, on values near 1
    (divided by the plan's powers of two c_s, exactly), with the result scaled back by C = prod c_s
    in float64, where the factor is representable, and rounded once to the compute dtype. The
    certificates count on this: products of subnormal values would lose more than they allow.

    The gradients flow at the magnitudes of that unit problem too: the scale-back passes dO on
    unchanged, and each input's gradient is multiplied by what the chain rule leaves (C for q, the
    keys and W; C / c_s for value slot s) in float64 on its way out. Scaling dO by a tiny C on the
    way in instead would run the whole backward on subnormal numbers."""
    divisors = plan.value_divisors
    if all(c == 1.0 for c in divisors):
        return run(ops)
    exps = [int(math.log2(c)) for c in divisors]
    total = sum(exps)

    def scaled(t: torch.Tensor | None, forward: int, backward: int) -> torch.Tensor | None:
        return t if t is None or not (forward or backward) else _PowerOfTwo.apply(t, forward, backward)

    unit = dataclasses.replace(
        ops, q=scaled(ops.q, 0, total), keys=tuple(scaled(k, 0, total) for k in ops.keys),
        values=tuple(scaled(v, -e, total - e) for v, e in zip(ops.values, exps)),
        rel=scaled(ops.rel, 0, total))
    out = run(unit)
    return scaled(out, total, 0)


class _PowerOfTwo(torch.autograd.Function):
    """x * 2^forward (in float64, rounded once to x's dtype), whose backward multiplies the incoming
    gradient by 2^backward (likewise) instead of 2^forward (``on_unit_values``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward: int, backward: int) -> torch.Tensor:
        ctx.backward_exp = backward
        return scale_by_exponent(x.to(torch.float64), forward).to(x.dtype) if forward else x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        e = ctx.backward_exp
        return (scale_by_exponent(g.to(torch.float64), e).to(g.dtype) if e else g), None, None


def scale_by_exponent(x: torch.Tensor, e: int) -> torch.Tensor:
    """x * 2^e, exactly (barring over/underflow of the result itself), in steps of at most 2^1000,
    so an exponent past float64's range on its own (two values near 1e200) never turns a 0 into NaN."""
    while e:
        step = max(-1000, min(1000, e))
        x = x * 2.0**step
        e -= step
    return x


#: the largest finite number of each result dtype
_LARGEST = {name: float(torch.finfo(getattr(torch, name)).max)
            for name in ("float16", "bfloat16", "float32", "float64")}


def check_fits(out: torch.Tensor, plan: Plan, ops: Operands) -> torch.Tensor:
    """``out`` when it fits in the caller's dtype; an InputError instead of an inf after the cast."""
    top = _LARGEST[ops.out_dtype_name]
    if plan.vmax * 1.01 < top or out.numel() == 0:  # |out| <= vmax (up to the certified error)
        return out
    biggest = float(out.detach().abs().max())
    if biggest > top:
        raise InputError(
            f"the result has entries up to {biggest:.4g}, beyond the largest {ops.out_dtype_name} ({top:.4g}); it "
            f"would come back as inf. Fix: pass q in a wider dtype (the result takes q's dtype) or rescale the values"
        )
    return out


def attend(spec: Spec, q: Any, k: Any, v: Any, request: Request, spec_options: Mapping[str, Any] | None = None,
           *, return_info: bool = False, key_padding_mask: Any = None, attn_mask: Any = None):
    """``attention`` for a resolved spec and a validated Request (the nn modules call this)."""
    if not isinstance(spec, Spec) or not isinstance(request, Request):
        raise InputError(f"attend needs a ta.Spec and a ta.Request, got {type(spec).__name__} and "
                         f"{type(request).__name__}; ta.attention takes names and keywords")
    return_info = check_bool("return_info", return_info)
    with full_precision(_device(q)):  # the dtypes the plan certifies, under torch.autocast too
        ops = prepare(spec, q, k, v, request, dict(spec_options or {}), key_padding_mask=key_padding_mask,
                      attn_mask=attn_mask)
        maxima = operand_maxima(ops)  # the bounds and the gradient certificate share one pass over the inputs
        plan = plan_for(ops, request, maxima=maxima)
        result = ops.restore(check_fits(run_plan(plan, ops), plan, ops))
    if return_info:
        return result, AttentionInfo.from_plan(plan, certify_gradients(plan, ops, maxima))
    return result


def _device(q: Any) -> torch.device | str:
    """Where a call computes: q's device (numpy and lists: the CPU)."""
    return q.device if isinstance(q, torch.Tensor) else "cpu"


@with_call_signature()
def attention(q: Any, k: Any, v: Any, *, spec: str | Spec = "pairwise", return_info: bool = False,
              key_padding_mask: Any = None, attn_mask: Any = None, **options: Any):
    """Generalized attention: ``out_i = sum over key tuples of softmax(score) * value``.

    ``q`` is ``(..., n, d)``; for order-2 specs ``k`` is ``(..., m, d)`` and ``v`` is ``(..., m, e)``,
    for order-k specs they are sequences of k-1 arrays. The result has the array type, dtype,
    device and leading dims of ``q``. ``backend`` is ``"auto"``, ``"exact"``, ``"poly"`` or a
    registered baseline; poly certifies ``max|out - exact| <= tol * max|v|``. The keywords are the
    ``Request`` settings (``backend``, ``tol``, ``causal``, ``scale``, ``on_unbounded``,
    ``max_degree``, ``q_offset`` ...; see ``ta.Request`` for each one and its default) and the
    spec's own options (``rope_base``, ``rel`` ...). See docs/index.md and docs/design.md.

    Masks follow ``torch.nn.MultiheadAttention``: bool True = masked out, float = added to the
    scores. ``key_padding_mask`` broadcasts to ``(..., m)`` (one per key slot, or one for all);
    it runs on every backend but sdpa. ``attn_mask`` broadcasts to ``(..., n, m_1, ..., m_{k-1})``
    (or one ``(..., n, m_s)`` mask per key slot); a causal one runs as ``causal=True``, one that is
    the same for every query as a key mask, any other on exact only. A query whose key tuples are
    all masked gets 0 (docs/index.md#masks).

    Bad input raises a ``ta.TensorAttnError`` (``SpecError``, ``InputError``, ``BoundError``) that
    names the argument, the value and what is allowed; the table in docs/index.md ("Errors") says
    which and when. ``info.error_bound`` bounds max|out - exact| for the array returned, the cast
    to the dtype of q included.

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
    return attend(spec_obj, q, k, v, request, spec_options, return_info=return_info,
                  key_padding_mask=key_padding_mask, attn_mask=attn_mask)


def _unit_values(spec: Spec, k: Any) -> tuple[Spec, Any, Any]:
    """The spec under the default value einsum, the keys as tensors and unit values: for calls that
    need no values."""
    spec = Spec(spec.name, spec.score, positional=spec.positional, options=spec.options,
                coefficients=spec.coefficients, block_sizes=spec.block_sizes)
    keys = [to_tensor(x, "k" if spec.order == 2 else f"k[{i}]")[0]
            for i, x in enumerate(as_list(k, "k", spec.order - 1, spec))]
    v = [torch.ones(*x.shape[: max(0, x.ndim - len(f))], 1, dtype=x.dtype, device=x.device)
         for x, f in zip(keys, spec.slots.features[1:])]
    return (spec, keys[0], v[0]) if spec.order == 2 else (spec, tuple(keys), tuple(v))


def weights_for(spec: Spec, q: Any, k: Any, request: Request, spec_options: Mapping[str, Any] | None = None, *,
                key_padding_mask: Any = None, attn_mask: Any = None) -> torch.Tensor:
    """``attention_weights`` for a resolved spec and a validated Request (the nn modules call this)."""
    if request.backend not in ("auto", "exact"):
        raise InputError(
            f"the attention weights are computed by the exact backend, but backend={request.backend!r} was "
            f"requested; {request.backend!r} never forms the weights (n x m numbers per head for pairwise). "
            "Fix: backend='exact' (or 'auto') for this call, or return_info=True for the plan and its bounds"
        )
    request = dataclasses.replace(request, backend="exact")
    spec_obj, k, v = _unit_values(spec, k)
    with full_precision(_device(q)):
        ops = prepare(spec_obj, q, k, v, request, dict(spec_options or {}), key_padding_mask=key_padding_mask,
                      attn_mask=attn_mask)
        plan = plan_for(ops, request)
        if ops.n == 0 or ops.q.shape[0] == 0:
            w = ops.q.new_zeros(ops.q.shape[0], ops.n, *ops.ms)
        else:
            w = registered()["exact"].weights(plan, ops)
    w = w.reshape(*ops.lead, ops.n, *ops.ms)
    if ops.kind == "numpy":
        return w.cpu().numpy().astype(ops.out_dtype, copy=False)
    return w.to(ops.out_dtype)


@with_call_signature()
def attention_weights(q: Any, k: Any, *, spec: str | Spec = "pairwise", key_padding_mask: Any = None,
                      attn_mask: Any = None, **options: Any):
    """The attention weights ``softmax(score)`` over key tuples, ``(..., n, m_1, ..., m_{k-1})``.

    Computed by the exact backend and returned dense: n * m^(k-1) numbers per batch row, unlike
    ``attention``, which never forms them. Without gradient. Keywords as in ``attention``
    (``backend`` must be ``"auto"`` or ``"exact"``); rows whose key tuples are all masked are 0.

    >>> import torch, tensorattn as ta
    >>> q = torch.randn(2, 5, 4)
    >>> w = ta.attention_weights(q, q, key_padding_mask=torch.tensor([False, False, False, True, True]))
    >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2, 5))), float(w[..., 3:].abs().max())
    (torch.Size([2, 5, 5]), True, 0.0)
    """
    spec_obj = get_spec(spec)
    request, spec_options = Request.from_call(spec_obj, **options)
    return weights_for(spec_obj, q, k, request, spec_options, key_padding_mask=key_padding_mask,
                       attn_mask=attn_mask)


def grad_bound_for(info: AttentionInfo, d_out: Any, *, by_input: bool = False) -> float | dict[str, float] | None:
    """Certified bound on the gradient error of one call for the upstream gradient ``d_out``.

    For ``out.backward(d_out)``, bounds the l2 norm of the gradient error of every token (hence
    every entry: max |grad_poly - grad_exact|) w.r.t. q, the keys and the values; per input with
    ``by_input=True``. It is at most ``info.grad_error_bound * max_i ||d_out_i||_1``; the derivation
    is in docs/torch.md; it includes the last rounding of each gradient and its cast back to an
    fp16/bf16 input's dtype. Gradients w.r.t. ``rel`` (W) are not covered. Returns None where the
    backend has no certificate.
    """
    if not isinstance(info, AttentionInfo):
        raise InputError(f"grad_bound_for needs the AttentionInfo of a call (return_info=True), got "
                         f"{type(info).__name__}")
    if info.grad is None:
        return None
    t = to_tensor(d_out, "d_out")[0].detach().to(torch.float64)
    check_finite(t, "d_out")
    t = t.abs()
    lead = t.ndim - len(info.plan.spec.value_einsum.out_letters)  # rows dO_i: one per query token
    l1 = float(t.reshape(*t.shape[:lead], -1).sum(-1).max()) if t.numel() else 0.0
    bounds = info.grad.for_upstream(l1, float(t.max()) if t.numel() else 0.0)
    return bounds if by_input else max(bounds.values())


@with_call_signature()
def check_bounds(q: Any, k: Any, v: Any = None, *, spec: str | Spec = "pairwise", key_padding_mask: Any = None,
                 attn_mask: Any = None, **options: Any) -> Plan:
    """The bound check on real inputs: B, tau_k(n), beta, the degree and rank that poly needs for
    ``tol``, flops of exact vs poly, and the verdict (``plan.passed``). Returns the Plan that
    ``backend="auto"`` would run; keywords are as in ``attention``."""
    spec_obj = get_spec(spec)
    request, spec_options = Request.from_call(spec_obj, **options)
    if v is None:  # the check needs no values: plan with unit values under the default value einsum
        spec_obj, k, v = _unit_values(spec_obj, k)
    return plan_for(prepare(spec_obj, q, k, v, request, spec_options, key_padding_mask=key_padding_mask,
                            attn_mask=attn_mask), request)
