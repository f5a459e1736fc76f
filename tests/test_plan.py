"""The planner on its own: Request validation, make_plan's decisions, ta.plan without data, and
the layering (planning imports no backend)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tensorattn as ta
from tensorattn.request import Problem, Request
from tensorattn.testing import random_inputs

# --------------------------------------------------------------------------- Request


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(backend="nope"), "unknown backend 'nope'"),
        (dict(backend="polly"), "did you mean 'poly'"),
        (dict(backend=3), "unknown backend 3"),
        (dict(tol=0), "tol=0 must be a finite number in (0, 1)"),
        (dict(tol=1.0), "tol=1.0 must be a finite number in (0, 1)"),
        (dict(tol=float("nan")), "tol=nan"),
        (dict(tol="1e-3"), "tol='1e-3'"),
        (dict(tol=True), "a bool is not a number"),
        (dict(on_unbounded="warn"), "on_unbounded='warn' is not one of"),
        (dict(causal="yes"), "causal='yes' must be True or False"),
        (dict(causal=1), "causal=1 must be True or False"),
        (dict(scale=True), "scale=True must be a finite number"),
        (dict(scale=float("inf")), "scale=inf"),
        (dict(scale="1/8"), "scale='1/8'"),
        (dict(q_offset=-1), "q_offset=-1 must be an int >= 0"),
        (dict(q_offset=1.0), "got a float; pass 1"),
        (dict(q_offset=True), "a bool is not a number"),
        (dict(max_degree=-1), "max_degree=-1 must be an int >= 0"),
        (dict(max_rank=0), "max_rank=0 must be an int >= 1"),
        (dict(approximant="pade"), "approximant='pade' is not one of 'chebyshev', 'taylor'"),
        (dict(memory_budget=-5), "memory_budget=-5 must be an int >= 1"),
        (dict(memory_budget=0), "memory_budget=0"),
        (dict(degree=-2), "degree=-2 must be an int >= 0"),
        (dict(feature_dtype="float16"), "feature_dtype='float16' is not one of"),
        (dict(need_grad="yes"), "need_grad='yes' must be True or False"),
        (dict(features=0), "features=0 must be an int >= 1"),
        (dict(seed=-1), "seed=-1 must be an int >= 0"),
    ],
)
def test_request_refuses_bad_settings(kwargs, fragment):
    with pytest.raises(ta.InputError) as err:
        Request(**kwargs)
    assert fragment in str(err.value)


def test_request_accepts_numpy_scalars_and_converts_them():
    r = Request(tol=np.float32(0.01), scale=np.float64(0.125), q_offset=np.int64(3), max_degree=np.int32(9),
                causal=np.bool_(True), memory_budget=np.int64(1 << 20))
    assert type(r.tol) is float and r.tol == pytest.approx(0.01)
    assert type(r.scale) is float and r.scale == 0.125
    assert type(r.q_offset) is int and r.q_offset == 3 and type(r.max_degree) is int
    assert r.causal is True and r.memory_budget == 1 << 20


def test_request_defaults_live_once():
    r = Request()
    assert (r.backend, r.tol, r.on_unbounded, r.causal, r.scale, r.q_offset) == ("auto", 1e-3, "raise", False, None,
                                                                                 None)
    assert (r.max_degree, r.max_rank, r.approximant, r.memory_budget) == (40, 1 << 21, "chebyshev", 64 << 20)
    # the frontends show the same defaults in their signatures, taken from Request
    import inspect

    params = inspect.signature(ta.attention).parameters
    for name in Request.names():
        assert params[name].default == getattr(r, name), name


def test_request_from_call_splits_spec_options():
    rope = ta.get_spec("rope")
    req, opts = Request.from_call(rope, tol=1e-4, rope_layout="half")
    assert req.tol == 1e-4 and opts == {"rope_base": 10000.0, "rope_layout": "half"}
    with pytest.raises(ta.InputError, match="unknown option 'rope_bse'.*did you mean 'rope_base'"):
        Request.from_call(rope, rope_bse=10.0)
    with pytest.raises(ta.InputError, match="unknown option 'rope_base' for spec 'pairwise'"):
        Request.from_call(ta.get_spec("pairwise"), rope_base=10.0)


def test_request_with_causal():
    r = Request()
    assert r.with_causal(None) is r and r.with_causal(False) is r
    assert r.with_causal(True).causal is True and r.causal is False


# --------------------------------------------------------------------------- make_plan


def _problem(spec="pairwise", n=4096, d=8, beta=1.0, B=1.0, **kw):
    spec = ta.get_spec(spec)
    k = spec.order
    return Problem(spec=spec, n=n, ms=(kw.pop("m", n),) * (k - 1), D=d, value_dims=(d,) * (k - 1), E=d, beta=beta,
                   B=B, scale=1.0 / d, **kw)


def test_auto_picks_poly_when_bounded_and_cheaper():
    p = ta.make_plan(_problem(n=65536), Request())
    assert p.backend == "poly" and p.reason == "within bound and cheaper by the cost model"
    assert p.flops_poly * 2 < p.flops_exact and p.error_bound == p.certificate.output_error * p.vmax <= 1e-3


def test_auto_reasons_for_exact():
    assert ta.make_plan(_problem(n=16), Request()).reason == "cost model: exact is cheaper at this size"
    past = ta.make_plan(_problem(B=5.0, beta=25.0), Request())
    assert past.backend == "exact" and past.reason == "B is past the threshold" and not past.passed
    capped = ta.make_plan(_problem(n=65536), Request(max_degree=1))
    assert capped.backend == "exact" and "no certified polynomial" in capped.reason


def test_auto_when_poly_does_not_serve():
    class NoPoly(ta.Backend):
        name = "poly"

        def serves(self, spec, problem):
            return ta.Refusal("not today")

    registry = {"exact": ta.get_backend("exact"), "poly": NoPoly()}
    p = ta.make_plan(_problem(n=65536), Request(), backends=registry)
    assert p.backend == "exact" and "not today" in p.reason
    with pytest.raises(ta.InputError, match="backend='poly' cannot serve spec 'pairwise'.*not today.*'exact'"):
        ta.make_plan(_problem(n=65536), Request(backend="poly"), backends=registry)
    with pytest.raises(ta.InputError, match="not in the registry"):
        ta.make_plan(_problem(), Request(backend="sdpa"), backends=registry)


def test_named_backend_must_serve_the_spec():
    with pytest.raises(ta.InputError) as err:
        ta.make_plan(_problem("triple", n=64), Request(backend="sdpa"))
    msg = str(err.value)
    assert "backend='sdpa' cannot serve spec 'triple'" in msg and "2 key slots" in msg
    assert "Backends that can: 'exact', 'poly', 'taylor2'" in msg
    base = ta.make_plan(_problem(n=64), Request(backend="favor"))
    assert base.backend == "favor" and base.reason == "requested baseline (no certificate)" and base.error_bound is None
    exact = ta.make_plan(_problem(n=64), Request(backend="exact"))
    assert exact.reason == "requested" and 0.0 < exact.error_bound < 1e-4 and exact.score_grad_bound == 0.0
    assert exact.flops == exact.flops_exact


def test_poly_past_the_threshold():
    prob = _problem(B=3.0, beta=6.0)
    with pytest.raises(ta.BoundError) as err:
        ta.make_plan(prob, Request(backend="poly"))
    msg = str(err.value)
    for fragment in ("B = 3 is not below", "tau_2(n) = (ln 4096)^(1/2) = 2.884", "SETH", "Fix:"):
        assert fragment in msg
    with pytest.warns(ta.BoundWarning, match="falling back to exact"):
        fb = ta.make_plan(prob, Request(backend="poly", on_unbounded="fallback"))
    assert fb.backend == "exact" and fb.reason == "fallback: B past the threshold"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ign = ta.make_plan(prob, Request(backend="poly", on_unbounded="ignore"))
    assert ign.backend == "poly" and ign.certificate.output_error <= 1e-3


def test_poly_without_a_certificate():
    with pytest.raises(ta.BoundError, match="no polynomial of degree <= max_degree=2 certifies tol=0.001"):
        ta.make_plan(_problem(beta=3.0, B=1.7), Request(backend="poly", max_degree=2))
    with pytest.raises(ta.BoundError, match="above max_rank=10"):
        ta.make_plan(_problem(), Request(backend="poly", max_rank=10))


def test_pinned_degree_is_certified_as_it_is():
    p = ta.make_plan(_problem(beta=2.0), Request(backend="poly", degree=3, feature_dtype="float64"))
    assert p.degree == 3 and p.rank == math.comb(8 + 3, 3) and p.certificate.feature_dtype == "float64"
    assert p.reason == "degree pinned to 3" and p.error_bound > 1e-3  # degree 3 cannot reach tol at beta 2


def test_plan_repr_reads_like_a_report():
    text = repr(ta.plan("pairwise", n=65536, d=8, bound=1.0, scale=1 / 8))
    for fragment in ("Spec:               pairwise", "threshold tau_2(n)", "Polynomial:         chebyshev degree 5",
                     "Certified error:", "exact/poly =", "Backend:            poly"):
        assert fragment in text
    assert "none certifies" in repr(ta.plan("pairwise", n=64, d=8, bound=1.0, max_degree=0))
    assert "Polynomial" not in repr(ta.plan("pairwise", n=64, d=8, bound=1.0, backend="exact"))  # not searched


# --------------------------------------------------------------------------- ta.plan without data


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(n=-5, d=8, bound=1.0), "n=-5 must be an int >= 1"),
        (dict(n=1024.0, d=8, bound=1.0), "n=1024.0 must be an int >= 1 and <= 9,007,199,254,740,992 (got a float; "
                                         "pass 1024)"),
        (dict(n=64, d=0, bound=1.0), "d=0 must be an int >= 1"),
        (dict(n=64, m=0, d=4, bound=1.0), "m=0 must be an int >= 1"),
        (dict(n=64, d=4, bound=-1.0), "bound=-1.0 must be a finite number in [0"),
        (dict(n=64, d=4, bound=float("nan")), "bound=nan"),
        (dict(n=64, d=4), "needs bound="),
        (dict(n=64, bound=1.0), "needs d="),
        (dict(n=64, d=4, beta=-1.0), "beta=-1.0"),
        (dict(n=64, d=4, bound=1.0, e=-1), "e=-1 must be an int >= 0"),
        (dict(n=64, d=4, bound=1.0, batch=0), "batch=0 must be an int >= 1"),
        (dict(n=64, d=4, bound=1.0, dtype="int8"), "dtype='int8' must be one of 'float16', 'bfloat16'"),
        (dict(n=64, d=4, bound=1.0, tol=5), "tol=5"),
        (dict(n=64, d=4, bound=1.0, bogus=1), "unknown option 'bogus'"),
    ],
)
def test_plan_refuses_bad_sizes(kwargs, fragment):
    with pytest.raises(ta.InputError) as err:
        ta.plan("pairwise", **kwargs)
    assert fragment in str(err.value)


def test_plan_sizes_for_custom_spec():
    spec = ta.Spec("bilinear3", "ia,jb,kab->ijk")
    p = ta.plan(spec, n=256, sizes={"a": 2, "b": 3}, bound=1.0, scale=0.1, backend="exact")
    assert p.D == 6 and p.order == 3
    with pytest.raises(ta.InputError, match="no entry for contracted index 'b'"):
        ta.plan(spec, n=256, sizes={"a": 2}, bound=1.0)


def test_plan_beta_and_bound_relations():
    p = ta.plan("triple", n=4096, d=8, bound=1.5, scale=1 / 8, backend="exact")
    assert p.B == pytest.approx(1.5) and p.beta == pytest.approx(1.5**3 * 8 / 8)
    q = ta.plan("pairwise", n=4096, d=8, beta=2.0, scale=1 / 8, backend="exact")
    assert q.beta == 2.0 and q.B == pytest.approx(math.sqrt(2.0))
    assert ta.threshold(2, 4096) == pytest.approx(math.sqrt(math.log(4096)))
    assert ta.threshold(3, 1) == 0.0


MIXED = ta.Spec("mixed", "id,jd,kd->ijk + id,jd->ij", coefficients=(1.0, -0.5))


@pytest.mark.parametrize("spec", ["strassen", "tree", MIXED, ta.Spec("sep", "ia,ja->ij + ib,kb->ik")], ids=str)
def test_plan_without_data_fills_the_terms_of_a_polynomial(spec):
    """Every term's beta_t, B_t, order and D_t from the entry bound alone: the same as the data path
    on inputs whose entries all equal the bound (where the Hoelder bounds are attained)."""
    spec = ta.get_spec(spec)
    n, d, bound, scale = 64, 3, 0.7, 0.25
    p = ta.plan(spec, n=n, d=d, bound=bound, scale=scale, tol=1e-3)
    assert len(p.problem.terms) == len(spec.terms) and len(p.term_thresholds) == len(spec.terms)
    for term, st in zip(spec.terms, p.problem.terms):
        D_t = d ** len(term.contracted)
        assert (st.order, st.D) == (term.order, D_t)
        assert st.beta == pytest.approx(abs(term.coefficient) * scale * D_t * bound**term.order)
        assert st.B == pytest.approx(st.beta ** (1 / term.order))
    assert p.beta == pytest.approx(sum(t.beta for t in p.problem.terms))
    q, k, v = random_inputs(spec, n=n, d=d, dtype=np.float64)
    q, k = np.full_like(q, bound), tuple(np.full_like(x, -bound) for x in k)
    data = ta.check_bounds(q, k, v, spec=spec, scale=scale, tol=1e-3)
    for a, b in zip(p.problem.terms, data.problem.terms):
        assert (a.order, a.D) == (b.order, b.D)
        assert a.beta == pytest.approx(b.beta) and a.B == pytest.approx(b.B)
    assert (p.B, p.deciding_term, p.passed, p.degree) == (pytest.approx(data.B), data.deciding_term, data.passed,
                                                          data.degree)


def test_plan_without_data_for_a_polynomial_needs_the_bound():
    with pytest.raises(ta.InputError, match="attention polynomial 'strassen' needs bound="):
        ta.plan("strassen", n=64, d=4, beta=1.0)
    p = ta.plan("strassen", n=2048, d=4, bound=1.0, scale=1 / 4)
    assert p.backend == "poly" and p.poly_method and p.rank and "Term 2:" in repr(p)
    past = ta.plan("tree", n=1024, d=4, bound=3.0, scale=1 / 4, backend="auto")
    assert not past.passed and past.backend == "exact"


def test_plan_relative_uses_w_support():
    from tensorattn.testing import random_rel

    W = random_rel(64, 64, 4, kind="rope")
    p = ta.plan("relative", n=64, d=4, bound=0.5, rel=W, scale=0.25, backend="poly")
    assert p.relative is not None and p.relative.support.nnz == 8  # 2x2 rotation blocks
    dense = ta.plan("relative", n=64, d=4, bound=0.5, scale=0.25, backend="poly")
    assert dense.relative.support.nnz == 16


# --------------------------------------------------------------------------- layering


def test_planning_imports_no_backend():
    code = ("import sys, tensorattn.planning.planner; "
            "print(sorted(m for m in sys.modules if m.startswith('tensorattn.backends')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # planning a call loads the built-ins through the registry, not through an import in planning
    code = ("import sys, tensorattn as ta; p = ta.plan('pairwise', n=65536, d=8, bound=1.0); "
            "print(p.backend, 'tensorattn.backends.poly' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["poly", "True"]


def test_planning_source_imports_no_backend():
    import ast
    from pathlib import Path

    root = Path(ta.__file__).parent / "planning"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "backends" not in (node.module or ""), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any("backends" in a.name for a in node.names), path.name


def test_request_reuse_keeps_validation_by_type():
    """Requests are reused for repeated keywords, but a value equal to an accepted one and of
    another type is validated anew (True == 1, and causal=1 is refused)."""
    spec = ta.get_spec("pairwise")
    first, _ = Request.from_call(spec, causal=True, tol=1e-3)
    again, _ = Request.from_call(spec, causal=True, tol=1e-3)
    assert again is first
    with pytest.raises(ta.InputError, match="causal"):
        Request.from_call(spec, causal=1, tol=1e-3)
    opts = Request.from_call(ta.get_spec("rope"), rope_base=500.0)[1]
    opts["rope_base"] = 1.0  # the caller's copy: the cached options are not changed
    assert Request.from_call(ta.get_spec("rope"), rope_base=500.0)[1]["rope_base"] == 500.0
