"""Approximants, certificates, feature maps and plans."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.approx import Chebyshev, Taylor, feature_map, monomial_tables, output_error, query_weights, rank_for
from tensorattn.approx.features import FeatureProgram

APPROX = [Chebyshev(), Taylor()]


@pytest.mark.parametrize("approx", APPROX, ids=lambda a: a.name)
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
def test_certificate_bounds_measured_relative_error(approx, beta):
    s = np.linspace(-beta, beta, 20001)
    for g in range(0, 26, 3):
        c = approx.coefficients(beta, g)
        P = np.polynomial.polynomial.polyval(s, c)
        measured = float(np.max(np.abs(P * np.exp(-s) - 1)))
        cert = approx.certified_error(beta, g)
        assert measured <= cert, f"{approx.name} beta={beta} g={g}: measured {measured:.3e} > {cert:.3e}"


@pytest.mark.parametrize("approx", APPROX, ids=lambda a: a.name)
def test_degree_monotone_in_beta_and_tol(approx):
    betas = [0.25, 0.5, 1, 2, 3, 4, 6]
    for tol in (1e-2, 1e-3, 1e-5):
        degrees = [approx.degree_for(b, tol) for b in betas]
        assert degrees == sorted(degrees), degrees
    for b in betas:
        degrees = [approx.degree_for(b, t) for t in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)]
        assert degrees == sorted(degrees), degrees


def test_chebyshev_beats_taylor():
    for beta in (1.0, 2.0, 4.0):
        assert Chebyshev().degree_for(beta, 1e-3) < Taylor().degree_for(beta, 1e-3)


def test_chebyshev_certificate_is_tight():
    """Within a small factor of the measured error: the certificate is useful, not just safe."""
    for beta in (1.0, 4.0):
        g = Chebyshev().degree_for(beta, 1e-3)
        s = np.linspace(-beta, beta, 20001)
        P = np.polynomial.polynomial.polyval(s, Chebyshev().coefficients(beta, g))
        measured = np.max(np.abs(P * np.exp(-s) - 1))
        assert Chebyshev().certified_error(beta, g) < 3 * measured


@given(st.floats(0, 0.99), st.integers(1, 50), st.integers(0, 2**16))
def test_transfer_lemma(eps, m, seed):
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=m)
    v = rng.uniform(-1, 1, size=m)
    delta = rng.uniform(-eps, eps, size=m)
    delta[rng.integers(0, m)] = eps  # push to the edge
    exact = (w * v).sum() / w.sum()
    approx = (w * (1 + delta) * v).sum() / (w * (1 + delta)).sum()
    assert abs(approx - exact) <= output_error(eps) * np.abs(v).max() + 1e-12


def test_output_error_edge():
    assert output_error(0.0) == 0.0
    assert output_error(1.0) == math.inf
    assert output_error(1e-4) == pytest.approx(1e-4)


@pytest.mark.parametrize("D, g", [(1, 5), (3, 4), (8, 5), (5, 0), (2, 9)])
def test_rank_and_multinomials(D, g):
    tab = monomial_tables(D, g)
    assert tab.rank == rank_for(D, g) == math.comb(D + g, g)
    for t in range(g + 1):
        # sum of multinomials over |alpha| = t is D^t
        assert tab.multinomial[tab.degree == t].sum() == D**t


@given(st.integers(1, 4), st.integers(0, 6), st.integers(0, 2**16))
def test_features_reproduce_polynomial_of_score(D, g, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, D, generator=gen, dtype=torch.float64) * 2 - 1
    y = torch.rand(6, D, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.rand(4, D, generator=gen, dtype=torch.float64) * 2 - 1
    c = Chebyshev().coefficients(1.5, g)
    w = torch.as_tensor(query_weights(c, 0.7, D, g))
    s2 = 0.7 * x @ y.T
    P2 = sum(c[t] * s2**t for t in range(g + 1))
    torch.testing.assert_close((feature_map(x, g) * w) @ feature_map(y, g).T, P2, rtol=1e-10, atol=1e-10)
    s3 = 0.7 * torch.einsum("id,jd,kd->ijk", x, y, z)
    P3 = sum(c[t] * s3**t for t in range(g + 1))
    U3 = torch.einsum("ir,jr,kr->ijk", feature_map(x, g) * w, feature_map(y, g), feature_map(z, g))
    torch.testing.assert_close(U3, P3, rtol=1e-10, atol=1e-10)


@given(st.integers(1, 12), st.integers(0, 5), st.integers(1, 3), st.integers(1, 600),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**16))
def test_feature_program_is_feature_map(D, g, Z, N, dtype, seed):
    """A FeatureProgram (views and indices made once, block products or row gathers by its cost
    model) writes into its buffer exactly what feature_map computes, call after call, also when
    another program has written the shared buffer in between."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.empty(Z * rank_for(D, g) * N, dtype=dtype)
    out = buf.view(Z, rank_for(D, g), N)
    program = FeatureProgram(out, D, g)
    other = FeatureProgram(buf[: Z * rank_for(D, g) * max(1, N // 2)].view(Z, rank_for(D, g), -1), D, g)
    for _ in range(2):
        x = (torch.rand(Z, N, D, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        other(x[:, : max(1, N // 2)])
        got = program(x)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, feature_map(x, g))


def test_plan_report_reads_like_pathinfo():
    p = ta.plan("pairwise", n=65536, d=8, bound=1.0, scale=1 / 8, tol=1e-3)
    text = repr(p)
    for fragment in ("Spec:", "pairwise", "threshold tau_2(n) = (ln 65536)^(1/2) = 3.3302", "within bound",
                     "chebyshev degree 5, rank 1,287", "Certified error", "Exact flops", "Poly flops",
                     "Backend:            poly"):
        assert fragment in text, fragment
    assert p.flops_poly < p.flops_exact


def test_plan_triple_threshold_and_refusal():
    ok = ta.plan("triple", n=4096, d=8, bound=1.9, scale=1 / 8)
    assert ok.passed and ok.threshold == pytest.approx(math.log(4096) ** (1 / 3))
    bad = ta.plan("triple", n=4096, d=8, bound=2.1, scale=1 / 8)
    assert not bad.passed and bad.backend == "exact" and "past the threshold" in repr(bad)
    with pytest.raises(ta.BoundError, match="order 3"):
        ta.plan("triple", n=4096, d=8, bound=2.1, scale=1 / 8, backend="poly")


def test_plan_entry_bound_equals_B0_with_papers_scale():
    for k, spec in ((2, "pairwise"), (3, "triple")):
        p = ta.plan(spec, n=1000, d=16, bound=1.3, scale=1 / 16)
        assert p.B == pytest.approx(1.3)
        assert p.order == k


def test_plan_degree_monotone():
    degs = [ta.plan("pairwise", n=10**6, d=4, beta=b, tol=1e-3).degree for b in (0.5, 1, 2, 4, 8)]
    assert degs == sorted(degs)
    degs = [ta.plan("pairwise", n=10**6, d=4, beta=2, tol=t).degree for t in (1e-2, 1e-3, 1e-4, 1e-5)]
    assert degs == sorted(degs)


def test_plan_input_errors():
    with pytest.raises(ta.InputError, match="needs d="):
        ta.plan("pairwise", n=10, bound=1.0)
    with pytest.raises(ta.InputError, match="needs bound="):
        ta.plan("pairwise", n=10, d=4)
    with pytest.raises(ta.InputError, match="no entry for contracted index 'b'"):
        ta.plan(ta.Spec("c", "ia,jb,kab->ijk"), n=10, sizes={"a": 2}, bound=1.0)


@given(st.sampled_from(["chebyshev", "taylor"]), st.floats(1e-6, 17.9), st.sampled_from([1e-2, 1e-3, 1e-6, 1e-9]))
def test_degree_search_start_skips_only_failing_degrees(name, beta, tol):
    """The first candidate degree (found once per octave of beta) never skips a degree whose
    truncation error would meet tol at this beta, so the search picks the same degree."""
    from tensorattn.approx.polynomials import first_candidate_degree, get_approximant

    approx = get_approximant(name)
    start = first_candidate_degree(approx, beta, tol, 40)
    assert all(output_error(approx.truncation_error(beta, g)) > tol for g in range(min(start, 41)))
    full = next((g for g in range(41) if output_error(approx.truncation_error(beta, g)) <= tol), 41)
    assert start <= full


@given(st.sampled_from(["chebyshev", "taylor"]), st.floats(1e-6, 17.9), st.integers(0, 40))
def test_derivative_floor_is_below_the_bound(name, beta, g):
    """The gradient pre-check's floor never exceeds the derivative truncation bound it stands for."""
    from tensorattn.approx.polynomials import get_approximant

    approx = get_approximant(name)
    assert 0.0 <= approx.derivative_truncation_floor(beta, g) <= approx.derivative_truncation_error(beta, g)


@given(st.sampled_from(["chebyshev", "taylor"]), st.floats(1e-6, 17.9), st.sampled_from([1e-1, 1e-2, 1e-3, 1e-6]),
       st.integers(1, 64), st.integers(1, 1 << 14), st.integers(2, 4), st.sampled_from(["float32", "float64"]))
def test_gradient_degree_search_matches_the_plain_search(name, beta, tol, D, m, order, dtype):
    """With need_grad, the degree search (first candidate per octave, gradient floor) returns the
    certificate of the plain search that certifies every degree from 0 in turn."""
    from tensorattn.approx.polynomials import get_approximant
    from tensorattn.planning.certificate import FLOAT32_MAX_BETA, certify, choose_certificate

    approx = get_approximant(name)
    got = choose_certificate(approx, beta, tol, D, m, order, input_dtype=dtype, max_degree=40, need_grad=True)
    want = None
    for g in range(41):
        cert = certify(approx, beta, g, D, m, order, dtype)
        if dtype == "float32" and (beta > FLOAT32_MAX_BETA or cert.roundoff > tol / 2
                                   or cert.derivative_roundoff > tol / 8):
            cert = certify(approx, beta, g, D, m, order, "float64")
        if cert.output_error <= tol and cert.grad_factor <= tol:
            want = cert
            break
    assert got == want
