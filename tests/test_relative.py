"""Relative positions: rope (rotate, then factor) and relative W_{i-j} (FFT-Toeplitz) on the poly
backend against the float64 reference, within the certified bound; the identities relative(I) =
pairwise and relative(RoPE rotations) = rope; decoding with q_offset = the matching slice of full
causal attention; errors; and what the plan reports."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.planning.relative import toeplitz_terms
from tensorattn.testing import random_inputs, random_rel, reference_attention


def half_layout(W: np.ndarray) -> np.ndarray:
    """RoPE matrices of ``random_rel(kind='rope')`` (pairs 2l, 2l+1) moved to the half layout (l, l+d/2)."""
    d = W.shape[-1]
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return W[:, perm][:, :, perm]


def sparse_rel(n: int, m: int, d: int, *, q_offset: int = 0, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """Random W whose support is a fixed random pattern (about half the pairs)."""
    rng = np.random.default_rng(seed)
    W = random_rel(n, m, d, q_offset=q_offset, seed=seed, dtype=np.float64)
    mask = rng.random((d, d)) < 0.5
    return (W * mask).astype(dtype)


def max_err(out, ref) -> float:
    return float(np.abs(np.asarray(out, dtype=np.float64) - ref).max())


@st.composite
def relative_cases(draw):
    causal = draw(st.booleans())
    n = draw(st.integers(1, 10))
    q_offset = draw(st.sampled_from([None, 0, 1, 3]))
    m = n if causal and q_offset is None else draw(st.integers(1, 10))
    d = draw(st.sampled_from([2, 4]))
    e = draw(st.integers(1, 3))
    batch = draw(st.sampled_from([(), (2,), (2, 2)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    bound = draw(st.sampled_from([0.3, 0.6]))
    q, k, v = random_inputs("relative", n=n, d=d, m=m, e=e, batch=batch, bound=bound, dtype=dtype, seed=seed)
    kind = draw(st.sampled_from(["dense", "rope", "identity", "sparse"]))
    off = q_offset or 0
    if kind == "sparse":
        W = sparse_rel(n, m, d, q_offset=off, seed=seed, dtype=dtype)
    else:
        W = random_rel(n, m, d, kind=kind, q_offset=off, seed=seed, dtype=dtype)
    options = {"rel": W, "alibi_slope": draw(st.sampled_from([None, 0.25, 1.0]))}
    if q_offset is not None:
        options["q_offset"] = q_offset
    tol = draw(st.sampled_from([1e-2, 1e-3]))
    return q, k, v, causal, tol, options


@given(relative_cases())
def test_relative_poly_within_certified_bound(case):
    q, k, v, causal, tol, options = case
    out, info = ta.attention(q, k, v, spec="relative", backend="poly", causal=causal, tol=tol,
                             on_unbounded="ignore", return_info=True, **options)
    ref = reference_attention(q, k, v, spec="relative", causal=causal, **options)
    err = max_err(out, ref)
    assert info.error_bound <= tol * float(np.abs(v).max()) * (1 + 1e-12)
    assert err <= info.error_bound, f"measured {err:.3e} > certified {info.error_bound:.3e} (degree {info.degree})"
    if info.plan.rel_folded:  # one W at every offset (e.g. a single offset): the pairwise path
        assert info.plan.relative is None
        return
    assert info.backend == "poly" and info.feature_dtype == "float64"
    rel = info.plan.relative
    assert info.rank == rel.terms == math.comb(rel.support.nnz + info.degree, info.degree)
    assert rel.kernels <= rel.terms


@st.composite
def rope_cases(draw):
    causal = draw(st.booleans())
    n = draw(st.integers(1, 12))
    q_offset = draw(st.sampled_from([None, 0, 2, 5]))
    m = n if causal and q_offset is None else draw(st.integers(1, 12))
    d = draw(st.sampled_from([2, 4, 6]))
    batch = draw(st.sampled_from([(), (3,)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    q, k, v = random_inputs("rope", n=n, d=d, m=m, e=2, batch=batch, bound=draw(st.sampled_from([0.5, 1.0])),
                            dtype=dtype, seed=seed)
    options = {"rope_layout": draw(st.sampled_from(["interleaved", "half"])),
               "rope_base": draw(st.sampled_from([10000.0, 10.0]))}
    if q_offset is not None:
        options["q_offset"] = q_offset
    return q, k, v, causal, options


@given(rope_cases())
def test_rope_poly_within_certified_bound(case):
    q, k, v, causal, options = case
    out, info = ta.attention(q, k, v, spec="rope", backend="poly", causal=causal, on_unbounded="ignore",
                             return_info=True, **options)
    ref = reference_attention(q, k, v, spec="rope", causal=causal, **options)
    assert info.backend == "poly"
    assert max_err(out, ref) <= info.error_bound
    # rotations preserve norms, so beta is pairwise's beta on the unrotated inputs
    pair = ta.check_bounds(q, k, spec="pairwise")
    assert info.beta == pytest.approx(pair.beta, rel=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_relative_identity_equals_pairwise(causal):
    q, k, v = random_inputs("pairwise", n=9, d=4, e=3, batch=(2,), bound=0.7, dtype=np.float64, seed=3)
    W = random_rel(9, 9, 4, kind="identity", dtype=np.float64)
    rel_exact = ta.attention(q, k, v, spec="relative", rel=W, backend="exact", causal=causal)
    pair_exact = ta.attention(q, k, v, spec="pairwise", backend="exact", causal=causal)
    assert max_err(rel_exact, pair_exact) < 1e-12
    rel_poly, ri = ta.attention(q, k, v, spec="relative", rel=W, backend="poly", causal=causal, return_info=True)
    pair_poly, pi = ta.attention(q, k, v, spec="pairwise", backend="poly", causal=causal, return_info=True)
    assert (ri.beta, ri.B, ri.threshold, ri.passed) == pytest.approx((pi.beta, pi.B, pi.threshold, pi.passed))
    assert ri.degree == pi.degree and ri.rank == pi.rank  # W = I: one pair per coordinate
    # the same polynomial P evaluated two ways: equal up to float64 roundoff
    assert max_err(rel_poly, pair_poly) < 1e-10


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("q_offset", [None, 3])
def test_relative_rope_rotations_equal_rope(layout, q_offset):
    n, m, d = 6, 9, 4
    off = q_offset or 0
    q, k, v = random_inputs("rope", n=n, m=m, d=d, e=2, bound=0.8, dtype=np.float64, seed=5)
    W = random_rel(n, m, d, kind="rope", q_offset=off, dtype=np.float64)
    W = half_layout(W) if layout == "half" else W
    opts = {} if q_offset is None else {"q_offset": q_offset}
    for backend in ("exact", "poly"):
        a, ia = ta.attention(q, k, v, spec="relative", rel=W, backend=backend, return_info=True, **opts)
        b, ib = ta.attention(q, k, v, spec="rope", rope_layout=layout, backend=backend, return_info=True, **opts)
        assert ia.degree == ib.degree
        assert max_err(a, b) < 1e-10, backend
    # block-diagonal rotations: 2 nonzeros per row of W
    assert ia.plan.relative.support.nnz == 2 * d


CASES = [("pairwise", {}), ("rope", {"rope_layout": "half"}), ("relative", {"alibi_slope": 0.5})]


@pytest.mark.parametrize("spec,opts", CASES)
@pytest.mark.parametrize("backend", ["exact", "poly"])
def test_decoding_equals_slice_of_full_causal(spec, opts, backend):
    T, n, d = 14, 4, 4
    q, k, v = random_inputs(spec, n=T, d=d, e=3, batch=(2,), bound=0.6, dtype=np.float64, seed=11)
    opts = dict(opts)
    if spec == "relative":
        opts["rel"] = random_rel(T, T, d, kind="dense", dtype=np.float64, seed=11)  # (2T-1, d, d) serves both
    full = reference_attention(q, k, v, spec=spec, causal=True, **opts)
    dec, info = ta.attention(q[:, T - n:], k, v, spec=spec, backend=backend, causal=True, q_offset=T - n,
                             return_info=True, **opts)
    assert dec.shape == (2, n, 3)
    assert max_err(dec, full[:, T - n:]) <= max(info.error_bound, 1e-12)
    if backend == "exact":
        full_exact = ta.attention(q, k, v, spec=spec, backend="exact", causal=True, **opts)
        assert max_err(dec, full_exact[:, T - n:]) < 1e-12


@pytest.mark.parametrize("kind", ["dense", "rope", "sparse"])
def test_memory_budget_chunking_gives_the_same_result(kind):
    """Chunks of blocks and of block rows (small budgets), several blocks of one shape (rope's 2 x 2
    rotations) and zero kernels inside a block (a W without its (1, 1) entry) give the result of one
    pass, which matches exact attention."""
    d = 4 if kind == "rope" else 2
    q, k, v = random_inputs("relative", n=20, m=17, d=d, e=3, batch=(3,), bound=0.6, dtype=np.float64, seed=2)
    W = random_rel(20, 17, d, kind="dense" if kind == "sparse" else kind, dtype=np.float64, seed=2)
    if kind == "sparse":
        W[:, 1, 1] = 0.0
    kw = dict(spec="relative", rel=W, alibi_slope=0.3, scale=0.5)
    big, info = ta.attention(q, k, v, backend="poly", return_info=True, **kw)
    assert max_err(big, ta.attention(q, k, v, backend="exact", **kw)) <= info.error_bound
    for budget in (32768, 4096, 16):
        small = ta.attention(q, k, v, backend="poly", memory_budget=budget, **kw)
        assert max_err(small, big) < 1e-12


def test_toeplitz_terms_reproduce_the_polynomial():
    """sum_mu w_mu x_mu T_mu y_mu = sum_t c_t s^t, term by term from the tables (no FFT)."""
    from tensorattn.approx import feature_map, query_weights

    rng = np.random.default_rng(0)
    d, g = 3, 3
    Wt = rng.normal(size=(d, d)) * (rng.random((d, d)) < 0.6)
    qi, kj = rng.normal(size=d), rng.normal(size=d)
    a, b = np.nonzero(Wt)
    pairs = tuple(zip(a.tolist(), b.tolist()))
    coeffs = np.array([0.5, -1.0, 0.25, 2.0])
    w = query_weights(coeffs, 1.0, len(pairs), g)
    x, y = (feature_map(torch.tensor(z)[None], g)[0].numpy() for z in (qi, kj))
    total, first = 0.0, 0
    for dt in toeplitz_terms(d, pairs, g):
        T = np.prod(Wt[a[dt.pair_index], b[dt.pair_index]], axis=1) if dt.t else np.ones(1)
        H = np.zeros(dt.kernels)
        np.add.at(H, dt.kernel, w[dt.weight_index] * T)
        total += np.sum(x[first + dt.kernel_alpha] * H * y[first + dt.kernel_beta])
        first += dt.n_alpha
    s = qi @ Wt @ kj
    assert total == pytest.approx(np.polyval(coeffs[::-1], s), rel=1e-12)


def test_relative_autograd_runs():
    q, k, v = (torch.tensor(a, requires_grad=True)
               for a in random_inputs("relative", n=7, d=2, e=2, bound=0.5, dtype=np.float64, seed=1))
    W = torch.tensor(random_rel(7, 7, 2, dtype=np.float64), requires_grad=True)
    out = ta.attention(q, k, v, spec="relative", rel=W, backend="poly", causal=True, alibi_slope=0.2)
    grads = torch.autograd.grad(out.sum(), [q, k, v, W])
    assert all(bool(torch.isfinite(g).all()) for g in grads)


# --- errors -------------------------------------------------------------------------------------

def test_relative_w_wrong_shape_names_expected_shape_with_offset():
    q, k, v = random_inputs("relative", n=4, m=6, d=2)
    with pytest.raises(ta.InputError, match=r"expected \(11, 2, 2\) = \(q_offset\+n\+m-1, d, d\).*q_offset=2"):
        ta.attention(q, k, v, spec="relative", rel=random_rel(4, 6, 2), q_offset=2, backend="poly")


def test_relative_nan_in_w():
    q, k, v = random_inputs("relative", n=4, d=2)
    W = random_rel(4, 4, 2)
    W[3, 1, 0] = np.nan
    with pytest.raises(ta.InputError, match=r"rel contains 1 non-finite.*\(3, 1, 0\)"):
        ta.attention(q, k, v, spec="relative", rel=W, backend="poly")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_q_offset_must_be_a_non_negative_int(bad):
    q, k, v = random_inputs("rope", n=3, m=5, d=2)
    with pytest.raises(ta.InputError, match="q_offset=.* must be an int >= 0"):
        ta.attention(q, k, v, spec="rope", q_offset=bad, causal=True)


def test_relative_bound_check_is_pairwise_threshold():
    """W = I gives pairwise's B and sqrt(ln n) threshold, so the verdicts agree."""
    n, d = 64, 4
    q, k, v = random_inputs("relative", n=n, d=d, bound=2.0, dtype=np.float64, seed=0)
    W = random_rel(n, n, d, kind="identity", dtype=np.float64)
    rel = ta.check_bounds(q, k, spec="relative", rel=W, scale=1.0)
    pair = ta.check_bounds(q, k, spec="pairwise", scale=1.0)
    assert rel.threshold == pytest.approx(math.sqrt(math.log(n)))
    assert (rel.B, rel.passed) == (pytest.approx(pair.B), pair.passed) and not rel.passed
    with pytest.raises(ta.BoundError, match=r"tau_2\(n\) = \(ln 64\)\^\(1/2\).*SETH"):
        ta.attention(q, k, v, spec="relative", rel=W, backend="poly", scale=1.0)
    with pytest.warns(ta.BoundWarning):
        out = ta.attention(q, k, v, spec="relative", rel=W, backend="poly", scale=1.0, on_unbounded="fallback")
    assert max_err(out, reference_attention(q, k, v, spec="relative", rel=W, scale=1.0)) < 1e-12


def test_alibi_far_past_the_keys_is_refused_with_the_reason():
    """Queries far past the last key: the ALiBi decay of every weight leaves FFT roundoff uncertified."""
    q, k, v = random_inputs("relative", n=4, m=4, d=2, bound=0.3, dtype=np.float64)
    W = random_rel(4, 4, 2, q_offset=2000, dtype=np.float64)
    with pytest.raises(ta.BoundError, match=r"FFT roundoff alone .* 2000 positions past the last key"):
        ta.attention(q, k, v, spec="relative", rel=W, q_offset=2000, alibi_slope=1.0, backend="poly")
    out = ta.attention(q, k, v, spec="relative", rel=W, q_offset=2000, alibi_slope=1.0, backend="auto")
    ref = reference_attention(q, k, v, spec="relative", rel=W, q_offset=2000, alibi_slope=1.0)
    assert max_err(out, ref) < 1e-12


# --- the plan -----------------------------------------------------------------------------------

def test_plan_reports_terms_and_picks_fft_at_large_n():
    W = random_rel(16384, 16384, 4, kind="rope")
    p = ta.plan("relative", n=16384, d=4, bound=1.0, scale=1 / 4, rel=W)
    rel = p.relative
    assert rel.support.nnz == 8 and p.rank == rel.terms == math.comb(8 + p.degree, p.degree)
    assert rel.fft_len >= 2 * 16384 - 1 and rel.kernels < rel.terms
    assert "Toeplitz terms" in repr(p) and f"{rel.terms:,} over 8 of 16 (a,b) pairs" in repr(p)
    assert p.backend == "poly" and p.flops_poly < p.flops_exact
    small = ta.plan("relative", n=64, d=4, bound=1.0, scale=1 / 4)
    assert small.backend == "exact" and small.relative.support.nnz == 16  # no W given: dense


@pytest.mark.parametrize("backend", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True])
def test_constant_w_is_folded_into_q(backend, causal):
    """The same W at every offset is pairwise attention on q W: the plan says so, both backends
    take the pairwise path, and results match the brute force (poly within its certificate)."""
    q, k, v = random_inputs("pairwise", n=40, d=4, dtype=np.float64, seed=2)
    W0 = np.random.default_rng(2).uniform(-1, 1, (4, 4)) / 2
    W = np.broadcast_to(W0, (79, 4, 4)).copy()
    out, info = ta.attention(q, k, v, spec="relative", rel=W, backend=backend, causal=causal, return_info=True)
    assert info.plan.rel_folded and info.plan.relative is None and "folded into q" in repr(info.plan)
    want = reference_attention(q, k, v, spec="relative", rel=W, causal=causal)
    assert np.abs(out - want).max() <= max(info.error_bound, 1e-12)
    # ALiBi (not one matrix per offset any more) and gradients w.r.t. W keep the Toeplitz path
    _, info = ta.attention(q, k, v, spec="relative", rel=W, backend=backend, alibi_slope=0.1, return_info=True,
                           on_unbounded="ignore")
    assert not info.plan.rel_folded
    Wt = torch.tensor(W, requires_grad=True)
    out, info = ta.attention(torch.tensor(q), torch.tensor(k), torch.tensor(v), spec="relative", rel=Wt,
                             backend=backend, return_info=True, on_unbounded="ignore")
    assert not info.plan.rel_folded
    out.sum().backward()
    assert Wt.grad[-1].abs().sum() > 0  # every offset gets its own gradient


@given(st.integers(2, 4), st.integers(1, 5), st.integers(0, 2**16))
def test_kernel_products_over_shared_prefixes(d, g, seed):
    """KernelSpectra.products (prefix-shared) equals the plain product of each term's factors."""
    from tensorattn.backends.relative_fft import KernelSpectra

    rng = np.random.default_rng(seed)
    pairs = tuple((a, b) for a in range(d) for b in range(d) if rng.random() < 0.6) or ((0, 0),)
    Wp = torch.from_numpy(rng.uniform(-1.5, 1.5, (len(pairs), 7)))
    for dt in toeplitz_terms(d, pairs, g):
        spectra = KernelSpectra(dt, Wp, torch.ones(math.comb(len(pairs) + g, g), dtype=torch.float64), None, 16)
        mu = np.sort(rng.choice(dt.terms, size=min(dt.terms, 9), replace=False))
        want = torch.ones(mu.size, Wp.shape[1], dtype=torch.float64)
        for s in range(dt.t):
            want = want * Wp[torch.as_tensor(dt.pair_index[mu, s])]
        torch.testing.assert_close(spectra.products(mu), want, rtol=1e-14, atol=0)
