"""Polynomial backend: measured error never exceeds the certified bound; verdicts; dispatch."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.testing import random_inputs, reference_attention

from .strategies import CUSTOM, QUAD

POLY_SPECS = [ta.get_spec("pairwise"), ta.get_spec("triple"), ta.get_spec("rope"), CUSTOM, QUAD]
NMAX = {"pairwise": 40, "rope": 40, "triple": 12, "bilinear3": 7, "quad": 6}


@st.composite
def poly_cases(draw):
    spec = draw(st.sampled_from(POLY_SPECS))
    causal = draw(st.booleans())
    n = draw(st.integers(1, NMAX[spec.name]))
    m = n if causal else draw(st.integers(1, NMAX[spec.name]))
    d = {"rope": draw(st.sampled_from([2, 4])), "bilinear3": draw(st.integers(1, 2))}.get(
        spec.name, draw(st.integers(1, 4))
    )
    bound = draw(st.sampled_from([0.3, 1.0, 1.5]))
    batch = draw(st.sampled_from([(), (2,), (2, 2)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    tol = draw(st.sampled_from([1e-2, 1e-3, 1e-4]))
    seed = draw(st.integers(0, 2**16))
    q, k, v = random_inputs(spec, n=n, d=d, m=m, e=draw(st.integers(1, 4)), batch=batch, bound=bound,
                            dtype=dtype, seed=seed)
    opts = {"rope_layout": draw(st.sampled_from(["interleaved", "half"]))} if spec.name == "rope" else {}
    return spec, q, k, v, causal, tol, opts


@given(poly_cases())
def test_poly_error_within_certified_bound(case):
    spec, q, k, v, causal, tol, opts = case
    out, info = ta.attention(q, k, v, spec=spec, backend="poly", causal=causal, tol=tol,
                             on_unbounded="ignore", return_info=True, **opts)
    ref = reference_attention(q, k, v, spec=spec, causal=causal, **opts)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    vs = [v] if spec.order == 2 else list(v)
    vmax = math.prod(float(np.abs(x).max()) for x in vs)
    assert info.backend == "poly"
    assert info.error_bound <= tol * vmax * (1 + 1e-12), "certificate must meet the requested tol"
    assert err <= info.error_bound, (
        f"{spec.name}: measured {err:.3e} > certified {info.error_bound:.3e} "
        f"(degree {info.degree}, beta {info.beta:.3f}, {info.feature_dtype})"
    )
    assert info.rank == math.comb(info.plan.D + info.degree, info.degree)


def test_poly_matches_exact_torch_batch_heads():
    torch.manual_seed(0)
    q, k, v = (torch.rand(2, 4, 300, 8) * 2 - 1 for _ in range(3))
    out, info = ta.attention(q, k, v, backend="poly", scale=1 / 8, return_info=True)
    exact = ta.attention(q, k, v, backend="exact", scale=1 / 8)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 300, 8) and out.dtype == torch.float32
    err = (out - exact).abs().max().item()
    assert err <= info.error_bound, f"measured {err:.3e} > certified {info.error_bound:.3e}"


@pytest.mark.parametrize("causal", [False, True])
def test_poly_chunking_does_not_change_result(causal):
    q, k, v = random_inputs("triple", n=40, d=3, batch=(2,), dtype=np.float64, seed=5)
    a = ta.attention(q, k, v, spec="triple", backend="poly", causal=causal, on_unbounded="ignore")
    b = ta.attention(q, k, v, spec="triple", backend="poly", causal=causal, on_unbounded="ignore",
                     memory_budget=20000)
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_poly_decoding_with_q_offset_equals_full_causal_slice():
    q, k, v = random_inputs("triple", n=24, d=3, dtype=np.float64, seed=2)
    full = ta.attention(q, k, v, spec="triple", backend="poly", causal=True, on_unbounded="ignore")
    dec = ta.attention(q[16:], k, v, spec="triple", backend="poly", causal=True, q_offset=16,
                       on_unbounded="ignore")
    np.testing.assert_allclose(dec, full[16:], atol=1e-12)


def _uniform(n, d, B, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-B, B, (n, d)).astype(np.float32)


@pytest.mark.parametrize("B, passes", [(2.5, True), (3.0, False)])
def test_pairwise_verdict_at_n4096(B, passes):
    n, d = 4096, 8
    q, k = _uniform(n, d, B, 0), _uniform(n, d, B, 1)
    v = _uniform(n, d, 1.0, 2)
    report = ta.check_bounds(q, k, scale=1 / d)
    assert report.threshold == pytest.approx(math.sqrt(math.log(n)))
    assert report.passed is passes
    assert report.B == pytest.approx(B, rel=2e-3)
    if not passes:
        expected = r"B = 3 is not below the threshold tau_2\(n\) = \(ln 4096\)\^\(1/2\) = 2.884"
        with pytest.raises(ta.BoundError, match=expected):
            ta.attention(q, k, v, backend="poly", scale=1 / d)


@pytest.mark.parametrize("B, passes", [(1.9, True), (2.1, False)])
def test_triple_verdict_at_n4096(B, passes):
    n, d = 4096, 8
    q, k1, k2 = (_uniform(n, d, B, s) for s in range(3))
    report = ta.check_bounds(q, (k1, k2), spec="triple", scale=1 / d)
    assert report.threshold == pytest.approx(math.log(n) ** (1 / 3))
    assert report.passed is passes
    if not passes:
        v = _uniform(n, d, 1.0, 5)
        with pytest.raises(ta.BoundError, match="order 3") as err:
            ta.attention(q, (k1, k2), (v, v), spec="triple", backend="poly", scale=1 / d)
        assert "(ln 4096)^(1/3)" in str(err.value) and "SETH" in str(err.value)


def test_fallback_warns_and_equals_exact():
    q, k, v = random_inputs("pairwise", n=64, d=8, bound=3.0, seed=1)
    with pytest.warns(ta.BoundWarning, match="falling back to exact"):
        out, info = ta.attention(q, k, v, backend="poly", scale=1 / 8, on_unbounded="fallback", return_info=True)
    assert info.backend == "exact" and 0.0 < info.error_bound < 1e-4
    np.testing.assert_array_equal(out, ta.attention(q, k, v, backend="exact", scale=1 / 8))


def test_ignore_proceeds_certified_and_caps_degree():
    q, k, v = random_inputs("pairwise", n=64, d=2, bound=2.5, seed=1, dtype=np.float64)
    out, info = ta.attention(q, k, v, backend="poly", on_unbounded="ignore", return_info=True)
    assert not info.passed and info.backend == "poly"
    assert np.abs(out - reference_attention(q, k, v)).max() <= info.error_bound
    with pytest.raises(ta.BoundError, match=r"no polynomial of degree <= max_degree=3 certifies"):
        ta.attention(q, k, v, backend="poly", on_unbounded="ignore", max_degree=3)
    with pytest.raises(ta.BoundError, match=r"above max_rank=10"):
        ta.attention(q, k, v, backend="poly", on_unbounded="ignore", max_rank=10)


def test_auto_picks_exact_for_tiny_n_and_poly_for_large():
    q, k, v = random_inputs("pairwise", n=16, d=8)
    _, info = ta.attention(q, k, v, scale=1 / 8, return_info=True)
    assert info.backend == "exact"
    assert "cheaper" in info.plan.reason or "threshold" in info.plan.reason
    q, k, v = random_inputs("pairwise", n=8192, d=4, seed=3)
    out, info = ta.attention(q, k, v, scale=1 / 4, return_info=True)
    assert info.backend == "poly" and info.passed
    exact_rows = ta.attention(q[:64], k, v, scale=1 / 4, backend="exact")
    assert np.abs(out[:64] - exact_rows).max() <= info.error_bound


def test_poly_serves_relative_through_the_fft_path():
    from tensorattn.testing import random_rel

    q, k, v = random_inputs("pairwise", n=8, d=2, dtype=np.float64)
    W = random_rel(8, 8, 2)
    out, info = ta.attention(q, k, v, spec="relative", rel=W, backend="poly", on_unbounded="ignore",
                             return_info=True)
    assert info.plan.relative is not None and info.backend == "poly"
    assert np.abs(out - reference_attention(q, k, v, spec="relative", rel=W)).max() <= info.error_bound


def test_half_precision_poly_upcasts():
    q, k, v = (torch.rand(64, 8).to(torch.bfloat16) * 2 - 1 for _ in range(3))
    out, info = ta.attention(q, k, v, backend="poly", scale=1 / 8, return_info=True)
    assert out.dtype == torch.bfloat16 and info.feature_dtype == "float32"
    ref = reference_attention(q.float().numpy(), k.float().numpy(), v.float().numpy(), scale=1 / 8)
    # output rounding to bf16 (8 bits) dominates; the certificate covers the float32 computation
    assert np.abs(out.float().numpy() - ref).max() <= info.error_bound + 2 ** -8


def test_large_beta_uses_float64_features():
    q, k, v = random_inputs("pairwise", n=32, d=4, bound=2.0, seed=0)
    _, info = ta.attention(q, k, v, backend="poly", on_unbounded="ignore", return_info=True)
    assert info.beta > 4 and info.feature_dtype == "float64"


def test_no_warnings_on_normal_use():
    q, k, v = random_inputs("pairwise", n=64, d=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ta.attention(q, k, v, backend="poly")


@pytest.mark.parametrize("grad", [False, True])
def test_chunk_feature_buffers(grad):
    """The factorized engine writes every chunk's features into one reused buffer per role, kept
    for the next call on this thread: the result is bit-identical to fresh features per chunk;
    with autograd tracking the inputs no buffer is used (the backward may keep the features)."""
    from tensorattn.approx.features import feature_map
    from tensorattn.backends.poly import _programs, _workspace, polynomial_engine
    from tensorattn.inputs import prepare
    from tensorattn.planning.planner import make_plan, problem_for
    from tensorattn.request import Request

    q, k, v = (torch.rand(2, 700, 4, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    spec = ta.get_spec("pairwise")
    req, opts = Request.from_call(spec, backend="poly", scale=0.25, memory_budget=1 << 16)
    ops = prepare(spec, q, k, v, req, opts)
    plan = make_plan(problem_for(ops, req), req)
    _workspace().clear()
    _programs().clear()
    engine = polynomial_engine(plan, ops, factorized=True)
    assert engine.token_chunk(2) < 700  # several chunks
    fresh = polynomial_engine(plan, ops, factorized=True)
    fresh.query_features = fresh.key_features = lambda x: feature_map(x, plan.degree)
    first = engine.full()
    assert torch.equal(first, fresh.full())
    assert (not _workspace()) == grad and not engine.large
    if not grad:  # the next call reuses this call's buffers and feature programs, and gets the same result
        kept = {key: buf.data_ptr() for key, buf in _workspace().items()}
        programs = dict(_programs())
        assert programs and all(buf is _workspace()[key[0]] for key, (buf, _) in programs.items())
        assert torch.equal(polynomial_engine(plan, ops, factorized=True).full(), first)
        assert {key: buf.data_ptr() for key, buf in _workspace().items()} == kept
        assert all(_programs()[key][1] is prog for key, (_, prog) in programs.items())
        # a buffer replaced (a larger chunk came) makes its programs anew, for the new buffer
        for key, buf in list(_workspace().items()):
            _workspace()[key] = buf.new_empty(0)
        assert torch.equal(polynomial_engine(plan, ops, factorized=True).full(), first)
        assert all(buf is _workspace()[key[0]] for key, (buf, _) in _programs().items())
        assert len(_programs()) == len(programs)  # those of the replaced buffers are gone
