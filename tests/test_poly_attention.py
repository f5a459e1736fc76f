"""Attention polynomials: the spec language for sums of terms, its validation and structure, the
exact backends against the float64 brute force, and the certified poly backend (a tensor network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.testing import random_inputs, reference_attention

STRASSEN, TREE = ta.get_spec("strassen"), ta.get_spec("tree")
CHAIN = ta.Spec("chain3", "id,jd->ij + jd,kd->jk + kd,ld->kl")  # a 3-hop chain i-j-k-l
STAR = ta.Spec("star3", "id,jd->ij + id,kd->ik + id,ld->il")  # the query joined to three keys


# --------------------------------------------------------------------------- the spec language


def test_builtin_structures():
    s, t = STRASSEN.structure, TREE.structure
    assert (s.kind, s.order, s.is_tree, s.has_cycle, s.edges) == ("cycle", 3, False, True, ((0, 1), (1, 2), (0, 2)))
    assert (t.kind, t.is_tree, t.has_cycle, t.parent) == ("tree", True, False, (None, 0, 1))
    assert t.causal_pairs == ((1, 0), (2, 1)) and s.causal_pairs == ((1, 0), (2, 0))
    assert CHAIN.structure.parent == (None, 0, 1, 2) and STAR.structure.parent == (None, 0, 0, 0)
    assert ta.get_spec("triple").structure.kind == "single" and ta.get_spec("pairwise").structure.is_tree
    assert STRASSEN.is_polynomial and not ta.get_spec("triple").is_polynomial
    assert STRASSEN.value == "je,ke->ie" and STRASSEN.order == 3 and STRASSEN.contracted == ("d",)
    assert ta.Spec("h", "id,jd,kd->ijk + id,jd->ij").structure.kind == "general"


def test_blocks_per_occurrence():
    spec = ta.Spec("sep", "ia,ja->ij + ib,kb->ik")
    lay = spec.slots
    assert lay.blocks == (("a", "b"), None, None) and lay.features[1:] == ("a", "b")
    q, k, v = random_inputs(spec, n=5, d=3, e=2, dtype=np.float64)
    assert q.shape == (5, 6) and k[0].shape == (5, 3)
    out = ta.attention(q, k, v, spec=spec, backend="exact")
    assert np.abs(out - reference_attention(q, k, v, spec=spec)).max() < 1e-12
    # given block sizes split the axis unequally
    uneven = ta.Spec("uneven", "ia,ja->ij + ib,kb->ik", block_sizes={"a": 2, "b": 4})
    q, k, v = random_inputs(uneven, n=4, d=3, sizes={"a": 2, "b": 4}, e=2, dtype=np.float64)
    assert q.shape == (4, 6)
    out = ta.attention(q, k, v, spec=uneven, backend="exact")
    assert np.abs(out - reference_attention(q, k, v, spec=uneven)).max() < 1e-12
    with pytest.raises(ta.InputError, match="do not split equally into the 2 blocks"):
        ta.attention(np.ones((4, 5)), k, v, spec=spec)


@pytest.mark.parametrize(
    "score, kwargs, fragment",
    [
        ("id,jd->ij + kd->k", {}, "term 1 ('kd->k')"),
        ("id,jd->ij + kd->k", {}, "cannot be reached from the query slot"),
        ("id,jd->ij + jd,kdd->jk", {}, "term 1 ('jd,kdd->jk')"),
        ("id,jd->ij + ", {}, "term 1 is empty"),
        ("id,jd->ij + jd,jd->jj", {}, "term 1"),
        ("id,jd->ij + jab,kab->jk", {}, "slot 'j' carries different features"),
        ("id,jd->ij + jd,kd->jk", {"coefficients": (1.0,)}, "2 term(s) but coefficients has 1"),
        ("id,jd->ij + jd,kd->jk", {"coefficients": (1.0, float("nan"))}, "finite numbers"),
        ("ia,ja->ij + ib,kb->ik", {"block_sizes": {"z": 2}}, "block_sizes names ['z']"),
        ("id,jd->ij + jd,kd->jk", {"positional": "rope"}, "needs the pairwise score"),
    ],
)
def test_polynomial_spec_errors_name_the_term(score, kwargs, fragment):
    with pytest.raises(ta.SpecError) as err:
        ta.Spec("bad", score, **kwargs)
    assert fragment in str(err.value)


def test_score_einsum_is_for_single_terms_only():
    with pytest.raises(ta.SpecError, match="attention polynomial with 3 term"):
        _ = STRASSEN.score_einsum
    assert ta.get_spec("triple").score_einsum.expr == "id,jd,kd->ijk"


def test_polynomial_specs_pickle_and_compare():
    import pickle

    spec = ta.Spec("c", "id,jd->ij + jd,kd->jk", coefficients=(1.0, -0.5))
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and hash(again) == hash(spec) and again.terms[1].coefficient == -0.5
    assert spec != ta.Spec("c", "id,jd->ij + jd,kd->jk")


# --------------------------------------------------------------------------- exact


@pytest.mark.parametrize("spec", [STRASSEN, TREE, CHAIN, STAR], ids=lambda s: s.name)
@pytest.mark.parametrize("causal", [False, True])
def test_exact_equals_brute_force(spec, causal):
    n = 64 if spec.order == 3 else 12
    q, k, v = random_inputs(spec, n=n, d=4, e=3, batch=(2,), dtype=np.float64, seed=3)
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal)
    assert np.abs(out - reference_attention(q, k, v, spec=spec, causal=causal)).max() <= 1e-10


@st.composite
def polynomial_cases(draw):
    """A random attention polynomial over 2-4 slots: a random spanning set of terms (each over
    1-3 slots, sharing one feature letter or with per-term letters), coefficients in [-1, 1]."""
    order = draw(st.integers(2, 4))
    tokens = "ijkl"[:order]
    shared = draw(st.booleans())
    terms, letters = [], iter("abcdefgh")
    joined = {0}
    for slot in range(1, order):  # a spanning tree of 2-slot terms keeps every slot reachable
        parent = draw(st.sampled_from(sorted(joined)))
        terms.append((parent, slot))
        joined.add(slot)
    for _ in range(draw(st.integers(0, 2))):
        size = draw(st.integers(1, min(3, order)))
        terms.append(tuple(sorted(draw(st.lists(st.integers(0, order - 1), min_size=size, max_size=size,
                                                unique=True)))))
    if not shared:  # per-term letters only where every occurrence of a slot has one letter: fine here
        exprs = []
        for term in terms:
            c = next(letters, "z")
            exprs.append(",".join(tokens[s] + c for s in term) + "->" + "".join(tokens[s] for s in term))
    else:
        exprs = [",".join(tokens[s] + "d" for s in term) + "->" + "".join(tokens[s] for s in term) for term in terms]
    coeffs = tuple(draw(st.sampled_from([1.0, -1.0, 0.5, -0.25])) for _ in terms)
    spec = ta.Spec("drawn", " + ".join(exprs), coefficients=coeffs)
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(1, 7 if order < 4 else 5))
    m = n if causal else draw(st.integers(1, 7 if order < 4 else 5))
    q, k, v = random_inputs(spec, n=n, m=m, d=draw(st.integers(1, 3)), e=draw(st.integers(1, 3)), dtype=dtype,
                            seed=draw(st.integers(0, 1000)))
    return spec, q, k, v, causal


@given(polynomial_cases())
def test_exact_random_polynomials(case):
    spec, q, k, v, causal = case
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal)
    tol = 1e-10 if q.dtype == np.float64 else 2e-5
    assert np.abs(out - reference_attention(q, k, v, spec=spec, causal=causal)).max() <= tol


@given(polynomial_cases())
def test_poly_random_polynomials_within_certificate(case):
    spec, q, k, v, causal = case
    try:
        out, info = ta.attention(q, k, v, spec=spec, backend="poly", causal=causal, on_unbounded="ignore",
                                 return_info=True)
    except ta.InputError as exc:  # causal polynomials without a fast factorized form say so
        assert causal and "backend='exact'" in str(exc)
        return
    except ta.BoundError:
        return  # no certified polynomial within max_degree for these draws: refused, never wrong
    exact = ta.attention(q.astype(np.float64), tuple(x.astype(np.float64) for x in k) if spec.order > 2 else
                         k.astype(np.float64), tuple(x.astype(np.float64) for x in v) if spec.order > 2 else
                         v.astype(np.float64), spec=spec, backend="exact", causal=causal)
    err = float(np.abs(out.astype(np.float64) - exact).max())
    assert err <= info.error_bound, (err, info.error_bound)


def test_overflow_safe_exact():
    """Scores ~ 1e4: the peers' packages overflow to inf/nan here; max-subtraction keeps us exact."""
    for spec in (STRASSEN, TREE):
        q, k, v = random_inputs(spec, n=16, d=4, e=2, bound=60.0, dtype=np.float64, seed=1)
        out = ta.attention(q, k, v, spec=spec, backend="exact", scale=1.0)
        assert np.isfinite(out).all()
        assert np.abs(out - reference_attention(q, k, v, spec=spec, scale=1.0)).max() <= 1e-10


# --------------------------------------------------------------------------- poly


@pytest.mark.parametrize("spec", [STRASSEN, TREE, CHAIN, STAR], ids=lambda s: s.name)
def test_poly_within_certificate(spec):
    n = 96 if spec.order == 3 else 16
    q, k, v = random_inputs(spec, n=n, d=4, e=3, batch=(2,), dtype=np.float64, seed=5)
    out, info = ta.attention(q, k, v, spec=spec, backend="poly", scale=0.25, tol=1e-4, return_info=True)
    err = np.abs(out - reference_attention(q, k, v, spec=spec, scale=0.25)).max()
    assert err <= info.error_bound <= 1e-4 * max(np.abs(x).max() for x in v) ** len(v)
    cert = info.plan.certificate
    assert len(cert.degrees) == len(spec.terms)
    assert info.plan.poly_method in ("network", "moments", "tree") and "Poly method" in repr(info.plan)


@pytest.mark.parametrize("spec, methods", [
    (STRASSEN, ("network", "moments")), (TREE, ("network", "moments", "tree")), (CHAIN, ("network", "moments", "tree")),
], ids=lambda x: getattr(x, "name", ""))
def test_every_poly_method_within_certificate(spec, methods):
    """Each method the planner may choose, forced through the plan, stays within the certificate."""
    import dataclasses

    from tensorattn.inputs import prepare
    from tensorattn.planning.network import build_networks

    n = 40 if spec.order == 3 else 12
    q, k, v = random_inputs(spec, n=n, d=3, e=2, batch=(2,), dtype=np.float64, seed=8)
    request = ta.Request(backend="poly", scale=0.3, tol=1e-4)
    ops = prepare(spec, q, k, v, request)
    plan = ta.plan_for(ops, request)
    want = reference_attention(q, k, v, spec=spec, scale=0.3)
    for method in methods:
        nets = None
        if method == "network":
            nets = build_networks(spec, ops.q.shape[0], ops.n, ops.ms, plan.certificate.ranks,
                                  plan.problem.value_shapes)
        forced = dataclasses.replace(plan, poly_method=method, networks=nets)
        out = ops.restore(ta.get_backend("poly").run(forced, ops))
        assert np.abs(out - want).max() <= plan.error_bound, method


@pytest.mark.parametrize("spec", [STRASSEN, TREE, CHAIN, STAR], ids=lambda s: s.name)
def test_causal_poly_trees_and_triangle(spec):
    n = 80 if spec.order == 3 else 14
    q, k, v = random_inputs(spec, n=n, d=3, e=2, dtype=np.float64, seed=9)
    out, info = ta.attention(q, k, v, spec=spec, backend="poly", causal=True, scale=0.3, tol=1e-4, return_info=True)
    assert info.plan.poly_method == ("triangle" if spec is STRASSEN else "tree")
    assert np.abs(out - reference_attention(q, k, v, spec=spec, causal=True, scale=0.3)).max() <= info.error_bound
    hard = ta.Spec("h", "id,jd->ij + jd,kd,ld->jkl")  # a 3-slot term: no fast causal form
    q, k, v = random_inputs(hard, n=6, d=2, dtype=np.float64)
    with pytest.raises(ta.InputError, match="fast factorized form only for trees"):
        ta.attention(q, k, v, spec=hard, backend="poly", causal=True)


def test_polynomial_bound_check_is_per_term():
    """A 2-slot term has threshold sqrt(ln n); a 3-slot term the cube root; the tightest decides."""
    mixed = ta.Spec("mixed", "id,jd,kd->ijk + id,jd->ij")
    q, k, v = random_inputs(mixed, n=256, d=4, bound=1.4, dtype=np.float64, seed=0)
    plan = ta.check_bounds(q, k, v, spec=mixed, scale=0.25)
    taus = plan.term_thresholds
    assert taus[0] == pytest.approx(np.log(256) ** (1 / 3)) and taus[1] == pytest.approx(np.log(256) ** 0.5)
    assert plan.deciding_term == 0 and plan.threshold == taus[0] and plan.threshold_order == 3
    with pytest.raises(ta.BoundError, match=r"term 0 \('id,jd,kd->ijk'\) \(order 3\)"):
        ta.attention(q, k, v, spec=mixed, backend="poly", scale=1.0)


@pytest.mark.parametrize("spec", [TREE, STRASSEN], ids=lambda s: s.name)
def test_poly_autograd_runs_through_the_network(spec):
    """The plan (degrees, coefficients from beta) is fixed once, so the surrogate is one smooth
    function of the inputs, whose exact gradient gradcheck checks."""
    from tensorattn.inputs import prepare

    q, k, v = random_inputs(spec, n=6, d=2, e=2, dtype=np.float64, seed=2)
    leaves = [torch.tensor(q, requires_grad=True), *(torch.tensor(x, requires_grad=True) for x in (*k, *v))]
    request = ta.Request(backend="poly", degree=4, on_unbounded="ignore")
    plan = ta.plan_for(prepare(spec, leaves[0], leaves[1:3], leaves[3:5], request), request)

    def f(*xs):
        ops = prepare(spec, xs[0], xs[1:3], xs[3:5], request)
        return ops.restore(ta.get_backend("poly").run(plan, ops))

    assert torch.autograd.gradcheck(f, leaves)


# --------------------------------------------------------------------------- the fast exact paths


def test_exact_paths_by_structure():
    assert (STRASSEN.exact_path, TREE.exact_path, CHAIN.exact_path, STAR.exact_path) == (
        "triangle", "tree", "tree", "tree")
    assert ta.get_spec("triple").exact_path == "tuples"
    assert ta.Spec("outer_tree", "id,jd->ij + jd,kd->jk", value="je,kf->ief").exact_path == "tuples"
    assert ta.Spec("h", "id,jd,kd->ijk + id,jd->ij").exact_path == "tuples"


@pytest.mark.parametrize(
    "spec",
    [
        ta.Spec("tri_bias", "id,jd->ij + jd,kd->jk + kd,id->ki + ja->j + kb->k + ic->i",
                coefficients=(1, -1, 0.5, 1, -2, 3)),
        ta.Spec("tree_multi", "ia,ja->ij + ib,jb->ij + jd,kd->jk + kc->k", coefficients=(1.0, -0.5, 1.0, 0.5)),
        ta.Spec("tri_blocks", "ia,ja->ij + jb,kb->jk + kc,ic->ki"),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_exact_paths_with_biases_blocks_and_several_terms_per_edge(spec, causal):
    assert spec.exact_path in ("tree", "triangle")
    q, k, v = random_inputs(spec, n=24, d=3, e=2, batch=(2,), dtype=np.float64, seed=4)
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal, scale=0.7)
    assert np.abs(out - reference_attention(q, k, v, spec=spec, causal=causal, scale=0.7)).max() <= 1e-10


@pytest.mark.parametrize("spec", [STRASSEN, TREE], ids=lambda s: s.name)
def test_fast_exact_paths_decode_with_q_offset(spec):
    q, k, v = random_inputs(spec, n=5, m=12, d=3, e=2, dtype=np.float64, seed=6)
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=True, q_offset=7)
    assert np.abs(out - reference_attention(q, k, v, spec=spec, causal=True, q_offset=7)).max() <= 1e-10


@pytest.mark.parametrize("spec", [STRASSEN, TREE, CHAIN], ids=lambda s: s.name)
@pytest.mark.parametrize("causal", [False, True])
def test_fast_exact_paths_gradcheck(spec, causal):
    n = 5 if spec.order == 3 else 4
    q, k, v = random_inputs(spec, n=n, d=2, e=2, dtype=np.float64, seed=7)
    nk = spec.order - 1
    leaves = [torch.tensor(q, requires_grad=True), *(torch.tensor(x, requires_grad=True) for x in (*k, *v))]

    def f(*xs):
        return ta.attention(xs[0], xs[1:1 + nk], xs[1 + nk:], spec=spec, backend="exact", causal=causal)

    assert torch.autograd.gradcheck(f, leaves)
    # double backward (create_graph=True): the tree and triangle paths recompute densely with a graph
    small = [x[..., :3, :].detach().requires_grad_(True) for x in leaves]
    assert torch.autograd.gradgradcheck(f, small)


def test_triangle_rows_whose_normalizer_underflows_stay_exact():
    """Shifts from three separate maxima can exceed a row's max by hundreds: such rows are
    recomputed in float64 (tier 1), then by the streaming kernel (tier 2), and stay exact."""
    from tensorattn.backends import structured

    rng = np.random.default_rng(0)
    n, d = 12, 2
    for mult, dtype, tier in ((14, np.float32, 1), (30, np.float64, 2)):
        rng = np.random.default_rng(0)
        for _ in range(1 if mult == 14 else 2):
            q, k1 = rng.normal(size=(n, d)) * mult, rng.normal(size=(n, d)) * mult
        k2 = -k1[::-1] * 1.3
        v1, v2 = rng.uniform(-1, 1, (n, 3)), rng.uniform(-1, 1, (n, 3))
        t = [torch.tensor(x, dtype=torch.float32 if dtype == np.float32 else torch.float64)[None] for x in (q, k1, k2)]
        tiers = structured._forward_all(structured._Tri(t[0], t[0], t[1], t[1], t[2], t[2]),
                                        torch.ones(1, n, 4, dtype=t[0].dtype), torch.ones(1, n, 4, dtype=t[0].dtype),
                                        structured._Cfg(False, 0, 1 << 26))[-1]
        assert (tiers == tier).any(), tiers
        args = [x.astype(dtype) for x in (q, k1, k2, v1, v2)]
        out = ta.attention(args[0], args[1:3], args[3:5], spec=STRASSEN, backend="exact", scale=1.0)
        want = reference_attention(q, (k1, k2), (v1, v2), spec=STRASSEN, scale=1.0)
        assert np.isfinite(out).all()
        assert np.abs(out - want).max() <= (1e-10 if dtype == np.float64 else 1e-5)
