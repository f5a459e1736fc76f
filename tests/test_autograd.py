"""Gradients: gradcheck for exact and poly, exact vs a naive softmax implementation, poly vs exact
within the certified gradient bound (docs/torch.md), the derivative certificate, and the exact
backward's O(n * block) saved state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.approx.polynomials import Chebyshev, Taylor
from tensorattn.testing import random_inputs, random_rel

from .strategies import CUSTOM, QUAD


def _leaves(q, k, v, dtype=torch.float64):
    """Fresh leaf tensors (q, keys, values) requiring grad; keys/values as lists."""
    ks = list(k) if isinstance(k, tuple) else [k]
    vs = list(v) if isinstance(v, tuple) else [v]
    return [torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True) for a in (q, *ks, *vs)]


def _call(spec, leaves, **kw):
    """ta.attention on leaves laid out as _leaves returns them."""
    spec = ta.get_spec(spec)
    nk = spec.order - 1
    q, ks, vs = leaves[0], leaves[1: 1 + nk], leaves[1 + nk: 1 + 2 * nk]
    k_arg, v_arg = (ks[0], vs[0]) if nk == 1 else (tuple(ks), tuple(vs))
    return ta.attention(q, k_arg, v_arg, spec=spec, **kw)


# ---------------------------------------------------------------------------------------------
# a naive torch implementation: materialize every score, softmax over all key tuples

def _rope_naive(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    d = x.shape[-1]
    out = []
    for l in range(d // 2):
        ang = pos.to(x.dtype) * base ** (-2.0 * l / d)
        a, b = x[..., 2 * l], x[..., 2 * l + 1]
        out += [a * torch.cos(ang) - b * torch.sin(ang), a * torch.sin(ang) + b * torch.cos(ang)]
    return torch.stack(out, dim=-1)


def naive_attention(spec, q, ks, vs, *, causal=False, scale=None, rel=None, alibi_slope=None, q_offset=0):
    spec = ta.get_spec(spec)
    se, ve = spec.score_einsum, spec.value_einsum
    nk = spec.order - 1
    n, ms = q.shape[-1 - len(se.features[0])], [k.shape[-1 - len(f)] for k, f in zip(ks, se.features[1:])]
    qpos = torch.arange(n) + q_offset
    kpos = [torch.arange(m) for m in ms]
    if scale is None:
        sizes = {c: x.shape[x.ndim - len(f) + i] for x, f in zip([q, *ks], se.features) for i, c in enumerate(f)}
        scale = 1.0 / math.sqrt(math.prod(sizes[c] for c in se.contracted))
    if spec.positional == "rope":
        q, ks = _rope_naive(q, qpos, 10000.0), [_rope_naive(ks[0], kpos[0], 10000.0)]
    if spec.positional == "relative":
        idx = qpos[:, None] - kpos[0][None, :] + (ms[0] - 1)
        s = torch.einsum("...ia,ijab,...jb->...ij", q, rel[idx], ks[0]) * scale
        if alibi_slope:
            s = s - alibi_slope * (qpos[:, None] - kpos[0][None, :]).abs().to(s.dtype)
    else:
        s = torch.einsum(",".join("..." + op for op in se.operands) + "->..." + se.output, q, *ks) * scale
    if causal:
        mask = torch.ones(s.shape[-spec.order:], dtype=torch.bool)
        for slot in range(nk):
            shape = [n] + [1] * nk
            shape[1 + slot] = ms[slot]
            mask = mask & (kpos[slot][None, :] <= qpos[:, None]).reshape(shape)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.reshape(*s.shape[:-nk], -1), dim=-1).reshape(s.shape)
    expr = "..." + se.output + "," + ",".join("..." + op for op in ve.operands) + "->..." + ve.output
    return torch.einsum(expr, p, *vs)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, small sizes)

GRAD_SPECS = ["pairwise", "triple", "rope", CUSTOM, QUAD]


def _split(spec, xs):
    nk = ta.get_spec(spec).order - 1
    ks, vs = list(xs[1: 1 + nk]), list(xs[1 + nk: 1 + 2 * nk])
    return xs[0], (ks[0] if nk == 1 else ks), (vs[0] if nk == 1 else vs)


def _poly_with_fixed_plan(spec, leaves, *, causal, tol):
    """The poly backend with its plan (degree, coefficients) computed once from ``leaves``: the
    surrogate is then one fixed smooth function, whose exact gradient gradcheck can check."""
    from tensorattn.inputs import prepare

    spec = ta.get_spec(spec)
    request = ta.Request(backend="poly", tol=tol, on_unbounded="ignore", causal=causal, need_grad=True)

    def ops_of(xs):
        return prepare(spec, *_split(spec, xs), request)

    plan = ta.plan_for(ops_of(leaves), request)
    assert plan.backend == "poly"

    def f(*xs):
        ops = ops_of(xs)
        return ops.restore(ta.BACKENDS["poly"].run(plan, ops))

    return f


@pytest.mark.parametrize("backend", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("spec", GRAD_SPECS, ids=lambda s: getattr(s, "name", s))
def test_gradcheck(spec, causal, backend):
    small = getattr(spec, "name", spec) in ("bilinear3", "quad", "triple")
    n, d = (3, 2) if small else (5, 4)
    q, k, v = random_inputs(spec, n=n, d=d, e=2, batch=(2,), dtype=np.float64, seed=3)
    leaves = _leaves(q, k, v)
    if backend == "poly":
        f = _poly_with_fixed_plan(spec, leaves, causal=causal, tol=1e-2)
    else:
        def f(*xs):
            return _call(spec, list(xs), backend="exact", causal=causal)
    # the full Jacobian for exact pairwise; a random-direction check (fast_mode) elsewhere
    assert torch.autograd.gradcheck(f, tuple(leaves), fast_mode=not (spec == "pairwise" and backend == "exact"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, 0.3])
def test_gradcheck_relative_with_W(causal, alibi):
    q, k, v = random_inputs("pairwise", n=5, d=3, e=2, dtype=np.float64, seed=4)
    W = torch.tensor(random_rel(5, 5, 3, dtype=np.float64, seed=4), requires_grad=True)
    leaves = _leaves(q, k, v)

    def f(q_, k_, v_, W_):
        return ta.attention(q_, k_, v_, spec="relative", rel=W_, alibi_slope=alibi, backend="exact", causal=causal)

    assert torch.autograd.gradcheck(f, (*leaves, W))


def test_gradcheck_exact_decode_offset():
    """Causal with q_offset (queries at the end of a KV cache)."""
    q, k, v = random_inputs("triple", n=2, m=5, d=3, e=2, dtype=np.float64, seed=5)
    leaves = _leaves(q, k, v)

    def f(*xs):
        return _call("triple", list(xs), backend="exact", causal=True, q_offset=3)

    assert torch.autograd.gradcheck(f, tuple(leaves))


# ---------------------------------------------------------------------------------------------
# exact gradients against the naive implementation, across several tiles

NAIVE_CASES = [
    # spec, n, m, d, causal, memory_budget (small budgets force many query/batch chunks)
    ("pairwise", 9, 1100, 4, False, 1 << 16),  # pairwise key block is 1024: two key blocks
    ("pairwise", 33, 33, 4, True, 1 << 12),
    ("triple", 11, 40, 3, False, 1 << 15),  # triple key blocks are 32 x 32
    ("triple", 35, 35, 3, True, 1 << 15),
    ("rope", 17, 17, 4, True, 1 << 12),
    (CUSTOM, 6, 7, 2, False, 1 << 12),
    (QUAD, 5, 5, 2, True, 1 << 12),
]


@pytest.mark.parametrize("spec,n,m,d,causal,budget", NAIVE_CASES, ids=lambda x: getattr(x, "name", None))
def test_exact_gradients_match_naive(spec, n, m, d, causal, budget):
    q, k, v = random_inputs(spec, n=n, m=m, d=d, e=3, batch=(2,), bound=1.5, dtype=np.float64, seed=6)
    a, b = _leaves(q, k, v), _leaves(q, k, v)
    nk = ta.get_spec(spec).order - 1
    out = _call(spec, a, backend="exact", causal=causal, memory_budget=budget)
    ref = naive_attention(spec, b[0], b[1: 1 + nk], b[1 + nk:], causal=causal)
    dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out.backward(dO)
    ref.backward(dO)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(a, b):
        err = float((x.grad - y.grad).abs().max())
        assert err <= 1e-10 * max(1.0, float(y.grad.abs().max())), err


@pytest.mark.parametrize("spec,path", [("pairwise", "_bilinear_backward"), ("triple", "_trilinear_backward")])
def test_exact_tile_backward_under_key_masks(spec, path, monkeypatch):
    """The written-out tile backward of q.k (pairwise) and triple scores, with a key padding
    mask over several tiles: output and gradients equal those of the same call with the masked keys
    dropped, and the masked keys get zero gradient."""
    import tensorattn.backends.exact as exact

    calls = []
    real = getattr(exact, path)
    monkeypatch.setattr(exact, path, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    nk = ta.get_spec(spec).order - 1
    m = 40 if nk == 2 else 1100  # two key blocks per slot (32 for triple, 1024 for pairwise)
    q, k, v = random_inputs(spec, n=9, m=m, d=4, e=3, batch=(2,), bound=1.5, dtype=np.float64, seed=3)
    keep = np.ones(m, bool)
    keep[[1, 4, m - 2]] = False
    a, b = _leaves(q, k, v), _leaves(q, k, v)
    mask = torch.from_numpy(np.broadcast_to(~keep, (2, m)).copy())
    out = _call(spec, a, backend="exact", memory_budget=1 << 15,
                key_padding_mask=mask if nk == 1 else [mask] * nk)
    short = [b[0], *[x[:, torch.from_numpy(keep)] for x in b[1:]]]
    ref = _call(spec, short, backend="exact", memory_budget=1 << 15)
    dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(dO)
    ref.backward(dO)
    assert calls, f"{spec} did not take {path}"
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13)
    for x, y in zip(a, b):  # the dropped keys' leaves get zero gradient on both sides
        assert x.grad.shape == y.grad.shape
        if x is not a[0]:
            assert float(x.grad[:, ~torch.from_numpy(keep)].abs().max()) == 0.0
        assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_relative_gradients_match_naive(causal):
    q, k, v = random_inputs("pairwise", n=12, m=12, d=3, e=2, batch=(2,), dtype=np.float64, seed=7)
    Wn = random_rel(12, 12, 3, dtype=np.float64, seed=7)
    a, b = _leaves(q, k, v), _leaves(q, k, v)
    Wa, Wb = (torch.tensor(Wn, requires_grad=True) for _ in range(2))
    out = ta.attention(*a, spec="relative", rel=Wa, alibi_slope=0.2, backend="exact", causal=causal,
                       memory_budget=1 << 11)
    ref = naive_attention("relative", b[0], [b[1]], [b[2]], causal=causal, rel=Wb, alibi_slope=0.2)
    dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(dO)
    ref.backward(dO)
    for x, y in zip([*a, Wa], [*b, Wb]):
        assert torch.allclose(x.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_need_grad_false_never_detaches_exact():
    q, k, v = _leaves(*random_inputs("pairwise", n=4, d=2, dtype=np.float64))
    out = ta.attention(q, k, v, backend="exact", need_grad=False)
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_exact_backward_saves_only_linear_state():
    """The recomputing backward keeps inputs, output and one log-sum-exp per row: O(n d), never
    the score tensor (n * m, or n * m^2 for triple)."""
    n, d = 64, 4
    leaves = _leaves(*random_inputs("triple", n=n, d=d, e=d, dtype=np.float64))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _call("triple", leaves, backend="exact")
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    new = [size for ptr, size in saved.items() if ptr not in inputs]  # aliases of inputs cost nothing
    assert sum(new) <= out.numel() + n  # the output and one log-sum-exp per row
    out.sum().backward()


# ---------------------------------------------------------------------------------------------
# the derivative certificate eps'(beta, g) (docs/design.md#gradients)

@pytest.mark.parametrize("approx", [Chebyshev(), Taylor()], ids=["chebyshev", "taylor"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 3.0, 6.0])
def test_derivative_error_bounds_measured(approx, beta):
    s = np.linspace(-beta, beta, 4001)
    for g in range(0, 18):
        c = approx.coefficients(beta, g)
        dp = np.polynomial.polynomial.polyval(s, np.arange(1, g + 1) * c[1:]) if g else np.zeros_like(s)
        measured = float(np.max(np.abs(dp - np.exp(s)) / np.exp(s)))
        bound = approx.derivative_error(beta, g)
        assert measured <= bound, (g, measured, bound)
        if beta > 0 and approx.name == "chebyshev" and 1e-12 < bound < 1:
            assert measured >= bound / 20, (g, measured, bound)  # the certificate is not vacuous


def test_need_grad_meets_tol_and_costs_few_degrees():
    from tensorattn.planning.certificate import choose_certificate

    for beta in [0.5, 1.0, 2.0, 4.0]:
        plain = choose_certificate(Chebyshev(), beta, 1e-3, 8, 256, 2, input_dtype="float32", max_degree=40)
        grad = choose_certificate(Chebyshev(), beta, 1e-3, 8, 256, 2, input_dtype="float32", max_degree=40,
                                  need_grad=True)
        assert grad.grad_factor <= 1e-3 and grad.output_error <= 1e-3
        assert plain.degree <= grad.degree <= plain.degree + 4


def test_requires_grad_raises_degree():
    q, k, v = random_inputs("pairwise", n=64, d=4, bound=1.0, seed=1)
    _, info0 = ta.attention(q, k, v, backend="poly", return_info=True)
    _, info1 = ta.attention(*_leaves(q, k, v, torch.float32), backend="poly", return_info=True)
    assert info1.degree >= info0.degree
    assert info1.plan.certificate.grad_factor <= 1e-3


# ---------------------------------------------------------------------------------------------
# poly gradients vs exact gradients, within the certified bound

def _grad_errors(spec, q, k, v, *, causal, tol, seed=0, **opts):
    """Per-input max-row-l2 gradient error of poly vs exact (float64), and the certified bounds."""
    grads, info, dO = {}, None, None
    for backend in ("exact", "poly"):
        leaves = _leaves(q, k, v)
        out, inf = _call(spec, leaves, backend=backend, causal=causal, tol=tol, on_unbounded="ignore",
                         return_info=True, **opts)
        if dO is None:
            dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out.backward(dO)
        grads[backend] = [x.grad for x in leaves]
        if backend == "poly":
            info = inf
    bounds = ta.grad_bound_for(info, dO, by_input=True)
    errors = {name: float((ge - gp).abs().max())
              for name, ge, gp in zip(info.grad.names, grads["exact"], grads["poly"])}
    return errors, bounds, info


GRAD_BOUND_CASES = [
    ("pairwise", 40, 4, False), ("pairwise", 40, 4, True),
    ("triple", 14, 3, False), ("triple", 14, 3, True),
    ("rope", 32, 4, False), ("rope", 32, 4, True),
    (CUSTOM, 7, 2, True), (QUAD, 6, 2, False),
]


@pytest.mark.parametrize("spec,n,d,causal", GRAD_BOUND_CASES, ids=lambda x: getattr(x, "name", None))
@pytest.mark.parametrize("tol", [0.3, 1e-3])
def test_poly_gradients_within_certified_bound(spec, n, d, causal, tol):
    q, k, v = random_inputs(spec, n=n, d=d, e=3, batch=(2,), bound=1.2, dtype=np.float64, seed=11)
    errors, bounds, info = _grad_errors(spec, q, k, v, causal=causal, tol=tol)
    assert set(errors) == set(bounds)
    for name in errors:
        assert errors[name] <= bounds[name], (name, errors[name], bounds[name])
    assert info.grad_error_bound == max(info.grad.per_l1)


@st.composite
def grad_cases(draw):
    spec = draw(st.sampled_from(["pairwise", "triple", "rope"]))
    causal = draw(st.booleans())
    n = draw(st.integers(1, 12 if spec == "triple" else 24))
    m = n if causal else draw(st.integers(1, 12 if spec == "triple" else 24))
    d = draw(st.sampled_from([2, 4]))
    bound = draw(st.sampled_from([0.5, 1.0, 1.6]))
    tol = draw(st.sampled_from([0.5, 1e-2, 1e-4]))
    seed = draw(st.integers(0, 2**16))
    q, k, v = random_inputs(spec, n=n, m=m, d=d, e=draw(st.integers(1, 3)), bound=bound, dtype=np.float64,
                            seed=seed)
    return spec, q, k, v, causal, tol, seed


@given(grad_cases())
def test_poly_gradients_within_bound_drawn(case):
    spec, q, k, v, causal, tol, seed = case
    errors, bounds, _ = _grad_errors(spec, q, k, v, causal=causal, tol=tol, seed=seed)
    for name in errors:
        assert errors[name] <= bounds[name], (name, errors[name], bounds[name])


@pytest.mark.parametrize("vsign", [1.0, -1.0])
def test_gradient_bound_is_attained_up_to_a_small_factor(vsign):
    """Adversarial scores at +-beta: the certified bound is within 20x of the measured error."""
    q = np.array([[1.0]])
    k = np.array([[1.0]] + [[-1.0]] * 10)
    v = np.array([[1.0]] + [[vsign]] * 10)
    errors, bounds, info = _grad_errors("pairwise", q, k, v, causal=False, tol=1e-3, scale=1.0)
    assert info.degree is not None
    for name in errors:
        assert errors[name] <= bounds[name]
    assert max(errors[x] / bounds[x] for x in errors) >= 1 / 20


def test_grad_error_bound_api():
    q, k, v = random_inputs("triple", n=8, d=3, e=2, dtype=np.float64, seed=2)
    leaves = _leaves(q, k, v)
    out, info = _call("triple", leaves, backend="poly", tol=1e-2, on_unbounded="ignore", return_info=True)
    dO = torch.ones_like(out)
    by = ta.grad_bound_for(info, dO, by_input=True)
    assert list(by) == ["q", "k[0]", "k[1]", "v[0]", "v[1]"]
    total = ta.grad_bound_for(info, dO)
    assert total == max(by.values()) <= info.grad_error_bound * out.shape[-1] + 1e-15
    # linear in the upstream gradient; numpy d_out works too
    assert math.isclose(ta.grad_bound_for(info, 3 * dO.numpy()), 3 * total, rel_tol=1e-12)
    assert ta.grad_bound_for(info, torch.zeros_like(out)) == 0.0
    _, exact_info = _call("triple", leaves, backend="exact", return_info=True)
    assert exact_info.grad_error_bound == 0.0 and ta.grad_bound_for(exact_info, dO) == 0.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alibi", [None, 0.2])
def test_relative_poly_gradients_within_certified_bound(causal, alibi):
    q, k, v = random_inputs("pairwise", n=12, d=2, e=2, dtype=np.float64, seed=3)
    W = random_rel(12, 12, 2, dtype=np.float64, seed=3)
    errors, bounds, info = _grad_errors("relative", q, k, v, causal=causal, tol=1e-2, rel=W, alibi_slope=alibi)
    assert info.backend == "poly" and set(errors) == {"q", "k", "v"}
    for name in errors:
        assert errors[name] <= bounds[name], (name, errors[name], bounds[name])


@pytest.mark.parametrize("vmag", [1e-45, 1e-43, 1e-41, 1e-30, 1e30, 1e37])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_gradients_within_bound_at_value_extremes(vmag, causal):
    """float32 values far from 1 (down to subnormal): the poly gradients, against float64 exact ones,
    stay within grad_bound_for. The backward runs at the magnitudes of the unit problem (dO is not
    scaled down on the way in) and the bound has a floor for the last rounding of a gradient that is
    itself subnormal; before, the error reached 187x the bound at 1e-44 and 1.3x at 1e-41."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        q, k = (torch.rand(1, 8, 4, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
        v = (torch.rand(1, 8, 4, generator=gen, dtype=torch.float64) * 2 - 1) * vmag
        d_out = torch.randn(1, 8, 4, generator=gen, dtype=torch.float64)
        got = [t.float().requires_grad_() for t in (q, k, v)]
        ref = [t.detach().double().requires_grad_() for t in got]  # the float32 inputs, exactly
        ta.attention(*ref, backend="exact", scale=0.5, causal=causal).backward(d_out)
        out, info = ta.attention(*got, backend="poly", scale=0.5, causal=causal, return_info=True)
        out.backward(d_out.float())
        bounds = ta.grad_bound_for(info, d_out.float(), by_input=True)
        for name, g, r in zip(("q", "k", "v"), got, ref):
            err = float((g.grad.double() - r.grad).abs().max())
            assert err <= bounds[name], (name, err, bounds[name])


@st.composite
def gradient_certificate_cases(draw):
    spec = draw(st.sampled_from(["pairwise", "triple", "rope"]))
    n = draw(st.integers(1, 8 if spec == "triple" else 16))
    d = draw(st.sampled_from([2, 4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    exponent = (draw(st.sampled_from([-45.0, -42.0, -38.0, -3.0, 0.0, 2.0, 30.0, 37.0])) if dtype == torch.float32
                else draw(st.sampled_from([-310.0, -300.0, -3.0, 0.0, 2.0, 300.0])))
    return dict(spec=spec, n=n, d=d, dtype=dtype, qmag=draw(st.sampled_from([0.01, 0.3, 1.0])),
                vmag=10.0 ** exponent, causal=draw(st.booleans()), tol=draw(st.sampled_from([1e-1, 1e-3])),
                scale=draw(st.sampled_from([0.25, 0.5, 1.0])), seed=draw(st.integers(0, 2**16)))


@given(gradient_certificate_cases())
def test_gradient_certificate_every_dtype_and_magnitude(case):
    """grad_bound_for holds against float64 exact gradients of the very inputs poly saw (float32 or
    float64, values from subnormal to near the dtype's limit, upstream gradients of every sign): the
    error bound plus the last rounding of each gradient into the compute dtype."""
    q, k, v = random_inputs(case["spec"], n=case["n"], d=case["d"], batch=(2,), dtype=np.float64,
                            seed=case["seed"])
    as_list = lambda x: list(x) if isinstance(x, (list, tuple)) else [x]  # noqa: E731
    raw = [q * case["qmag"], *(a * case["qmag"] for a in as_list(k)), *(a * case["vmag"] for a in as_list(v))]
    nk = len(as_list(k))
    got = [torch.from_numpy(a).to(case["dtype"]).requires_grad_() for a in raw]
    ref = [t.detach().double().requires_grad_() for t in got]
    split = lambda t: (t[0], t[1] if nk == 1 else t[1:1 + nk], t[1 + nk] if nk == 1 else t[1 + nk:])  # noqa: E731
    kw = dict(spec=case["spec"], scale=case["scale"], causal=case["causal"])
    try:
        out, info = ta.attention(*split(got), backend="poly", tol=case["tol"], on_unbounded="ignore",
                                 return_info=True, **kw)
    except ta.TensorAttnError:
        return
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]), dtype=torch.float64)
    out.backward(d_out.to(case["dtype"]))
    ta.attention(*split(ref), backend="exact", **kw).backward(d_out)
    bounds = ta.grad_bound_for(info, d_out.to(case["dtype"]), by_input=True)
    for name, g, r in zip(info.grad.names, got, ref):
        err = float((g.grad.double() - r.grad).abs().max())
        assert err <= bounds[name], (name, err, bounds[name])


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_bound_counts_only_unmasked_keys(causal):
    """Under a binary key mask the visible keys share all the attention, so the key and value
    gradient bounds are at least those of the same call with the masked keys dropped (whose maxima
    are no larger): the attention one key collects (G6) is counted over the unmasked keys only."""
    rng = np.random.default_rng(0)
    n = 50
    q, k, v = (torch.from_numpy(rng.uniform(-0.3, 0.3, (1, n, 4))) for _ in range(3))
    keep = torch.zeros(1, n, dtype=torch.bool)
    keep[0, [0, 1]] = True  # keys 0 and 1 are the only unmasked ones
    d_out = torch.from_numpy(rng.standard_normal((1, n, 4)))
    kw = dict(backend="poly", scale=0.5, causal=causal, degree=6, feature_dtype="float64")  # eta grows with beta
    _, masked = ta.attention(q, k, v, key_padding_mask=~keep, return_info=True, **kw)
    # every query of the masked call sees at most the two keys that each query sees here (causal:
    # query 0 sees key 0 alone), so one key collects no more attention here than there
    _, dropped = ta.attention(q, k[:, :2], v[:, :2], return_info=True, **{**kw, "causal": False})
    got, want = ta.grad_bound_for(masked, d_out, by_input=True), ta.grad_bound_for(dropped, d_out, by_input=True)
    for name in ("k", "v"):
        assert got[name] >= want[name] * (1 - 1e-12), (name, got[name], want[name])


@pytest.mark.parametrize("spec, backend, n, causal", [
    ("pairwise", "poly", 64, False),  # direct form: cached score kernel and scalars
    ("pairwise", "poly", 1024, False),  # factorized: kept feature buffers and query weights
    ("pairwise", "poly", 256, True),  # causal blocks
    ("triple", "poly", 64, False),
    ("rope", "poly", 64, False),
    ("relative", "poly", 64, False),
    ("pairwise", "exact", 64, True),
    ("pairwise", "favor", 64, False),  # cached random features
    ("pairwise", "taylor2", 64, False),
])
def test_calls_in_inference_mode_then_training(spec, backend, n, causal):
    """What one call keeps for the next (buffers, coefficient tensors, random features) is made
    outside inference mode: a call under torch.inference_mode() followed by a call that takes
    gradients, or by one under no_grad, with the same plan, runs and gives the same output."""
    q, k, v = random_inputs(spec, n=n, d=4, seed=3)
    q, k, v = (torch.from_numpy(x) if isinstance(x, np.ndarray) else tuple(map(torch.from_numpy, x)) for x in (q, k, v))
    kw = dict(spec=spec, backend=backend, causal=causal, scale=0.25)
    if spec == "relative":
        kw["rel"] = torch.from_numpy(random_rel(n, n, 4))
    with torch.inference_mode():
        first = ta.attention(q, k, v, **kw)
    with torch.no_grad():
        assert torch.equal(ta.attention(q, k, v, **kw), first)
    qg = q.clone().requires_grad_(True)
    ta.attention(qg, k, v, **kw).sum().backward()
    assert qg.grad is not None and bool(torch.isfinite(qg.grad).all())
    with torch.inference_mode():
        assert torch.equal(ta.attention(q, k, v, **kw), first)


def test_module_in_inference_mode_then_training():
    mha = ta.nn.MultiheadTensorAttention(16, 2, backend="poly")
    x = torch.rand(2, 300, 16) - 0.5
    with torch.inference_mode():
        mha(x, x, x)
    mha(x, x, x)[0].sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in mha.parameters())


@pytest.mark.parametrize("spec, backend, n, causal", [
    ("pairwise", "poly", 64, False),
    ("pairwise", "poly", 1024, False),
    ("pairwise", "poly", 256, True),
    ("triple", "poly", 48, False),
    ("pairwise", "exact", 64, True),
    ("triple", "exact", 24, False),
    ("strassen", "exact", 24, False),
    ("pairwise", "favor", 64, False),
])
def test_autocast_changes_nothing(spec, backend, n, causal):
    """Under torch.autocast (mixed precision) the library still computes in the dtypes its plan
    certifies: the output equals the call without autocast (within its error bound of the float64
    result), and the gradients are the same whether backward() runs inside the autocast region or
    after it. Without this, autocast ran the matrix products in bfloat16: exact's error was 1e-3
    against a bound of 1e-5."""
    q, k, v = random_inputs(spec, n=n, d=8, seed=5)
    q, k, v = (torch.from_numpy(x) if isinstance(x, np.ndarray) else tuple(map(torch.from_numpy, x)) for x in (q, k, v))
    kw = dict(spec=spec, backend=backend, causal=causal, scale=0.125)
    nk = len(k) if isinstance(k, tuple) else 1
    flat = [q, k, v] if nk == 1 else [q, *k, *v]

    def split(xs):
        return (xs[0], xs[1], xs[2]) if nk == 1 else (xs[0], xs[1: 1 + nk], xs[1 + nk:])

    reference = ta.attention(*split([x.double() for x in flat]), **{**kw, "backend": "exact"})
    outs, grads = [], []
    for autocast, inside in ((False, False), (True, False), (True, True)):
        leaves = [x.clone().requires_grad_(True) for x in flat]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, info = ta.attention(*split(leaves), return_info=True, **kw)
            if inside:
                out.backward(torch.ones_like(out))
        if not inside:
            out.backward(torch.ones_like(out))
        assert out.dtype == torch.float32
        if info.error_bound is not None:
            assert float((out.detach().double() - reference).abs().max()) <= info.error_bound
        outs.append(out.detach())
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(g, grads[0]))


def test_planned_backward_keeps_double_backward():
    """The rerouted backward of poly differentiates again (a gradient penalty), and its first
    gradients equal plain autograd's on the same graph."""
    q, k, v = (torch.rand(1, 40, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ta.attention(q, k, v, backend="poly", scale=0.5)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (gq.square().sum()).backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all()) and float(q.grad.abs().max()) > 0


def test_planned_backward_retains_its_graph_under_autocast():
    """backward(retain_graph=True) twice inside an autocast region: the second pass finds the graph
    and accumulates the same gradient again."""
    q, k, v = (torch.rand(1, 40, 4, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ta.attention(q, k, v, backend="poly", scale=0.5)
        out.sum().backward(retain_graph=True)
        once = q.grad.clone()
        out.sum().backward()
    assert torch.allclose(q.grad, 2 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["exact", "poly"])
def test_reduced_float32_matmul_precision_is_lifted_for_the_call(backend, monkeypatch):
    """torch.set_float32_matmul_precision("high") (TF32 on NVIDIA GPUs) would run the certified
    float32 products with ~10 significant bits: each call computes at "highest", forward and
    backward, and the setting is restored afterwards."""
    from tensorattn.registry import registered

    impl = registered()[backend]
    seen = []
    run = type(impl).run

    def spy(self, plan, ops):
        seen.append(torch.get_float32_matmul_precision())
        return run(self, plan, ops)

    monkeypatch.setattr(type(impl), "run", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        q = torch.rand(1, 32, 4, requires_grad=True)
        ta.attention(q, q, q, backend=backend, scale=0.5).sum().backward()
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_poly_backward_under_reduced_matmul_precision_is_rerouted(monkeypatch):
    """With a float32 matmul precision below "highest" at backward() time, poly's recorded graph is
    differentiated under full_precision, at "highest", and the setting is back afterwards; with
    "highest" the gradient passes straight through. Both give the same gradient."""
    import contextlib

    import tensorattn.api as api

    real = api.full_precision
    inside = []

    @contextlib.contextmanager
    def spy(device):
        with real(device):
            inside.append(torch.get_float32_matmul_precision())
            yield

    grads = []
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            q = torch.rand(1, 32, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            out = ta.attention(q, q, q, backend="poly", scale=0.5)
            torch.set_float32_matmul_precision(precision)
            monkeypatch.setattr(api, "full_precision", spy)
            inside.clear()
            out.sum().backward()
            monkeypatch.setattr(api, "full_precision", real)
            assert inside == ([] if precision == "highest" else ["highest"])
            assert torch.get_float32_matmul_precision() == precision
            grads.append(q.grad)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(*grads)


def test_poly_output_may_be_modified_in_place_in_training():
    """The result of a call that autograd records is a tensor of its own: adding to it in place
    (out += x) keeps the gradient right."""
    q, k, v = (torch.rand(2, 64, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plain = ta.attention(q, k, v, backend="poly", scale=0.125)
    (gq,) = torch.autograd.grad(plain.sum(), q)
    out = ta.attention(q, k, v, backend="poly", scale=0.125)
    out.add_(1.0)
    out.sum().backward()
    assert torch.allclose(q.grad, gq, rtol=1e-12, atol=1e-15)
