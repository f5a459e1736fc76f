"""Poly's direct form (P from the scores) and the per-call caches: same polynomial, same
certificate, same answer as the factorized form; plans reused only for an identical problem."""

import warnings

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.approx.polynomials import _chebyshev_coefficients, _chebyshev_monomials
from tensorattn.backends.poly import polynomial_engine
from tensorattn.inputs import prepare
from tensorattn.planning import plan_for
from tensorattn.request import Request
from tensorattn.testing import reference_attention


def _engine(q, k, v, **settings):
    spec = ta.get_spec("pairwise")
    request, options = Request.from_call(spec, backend="poly", on_unbounded="ignore", **settings)
    ops = prepare(spec, q, k, v, request, options, key_padding_mask=settings.pop("mask", None))
    plan = plan_for(ops, request)
    return polynomial_engine(plan, ops), plan


@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (40, 40)])
def test_direct_form_equals_factorized(n, m):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.rand(2, x, 4, generator=g, dtype=torch.float64) * 2 - 1 for x in (n, m, m))
    eng, plan = _engine(q, k, v)
    assert plan.poly_form == "direct" and eng.direct
    direct = eng.run()
    eng.direct = False
    factorized = eng.run()
    assert torch.allclose(direct, factorized, rtol=1e-10, atol=1e-12)


def test_direct_form_within_certificate_and_masks():
    rng = np.random.default_rng(3)
    q, k, v = (rng.uniform(-1, 1, (3, 24, 8)).astype(np.float32) for _ in range(3))
    mask = np.zeros((3, 24), bool)
    mask[0, :20] = True
    mask[2] = True  # every key masked: the rows get 0
    out, info = ta.attention(q, k, v, backend="poly", scale=1 / 8, key_padding_mask=mask, return_info=True)
    assert info.plan.poly_form == "direct"
    ref = ta.attention(q, k, v, backend="exact", scale=1 / 8, key_padding_mask=mask)
    assert float(np.abs(out - ref).max()) <= info.error_bound
    assert float(np.abs(out[2]).max()) == 0.0


def test_direct_form_only_within_the_certified_roundoff():
    # the plan reports the form; a certificate whose direct roundoff estimate is larger keeps features
    for n in (16, 64, 256):
        p = ta.plan("pairwise", n=n, d=8, bound=1.0, scale=1 / 8, backend="poly")
        cert = p.certificate
        assert (p.poly_form == "direct") <= cert.direct_ok
        assert cert.direct_roundoff > 0
    big = ta.plan("pairwise", n=1 << 16, d=8, bound=1.0, scale=1 / 8, backend="poly")
    assert big.poly_form == "factorized"
    causal = ta.plan("pairwise", n=64, d=8, bound=1.0, scale=1 / 8, backend="poly", causal=True)
    assert causal.poly_form == "factorized"


def test_direct_form_gradients_match():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, 6, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ta.attention(q, k, v, backend="poly", tol=1e-2)
    ref = reference_attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), scale=3 ** -0.5)
    assert np.abs(out.detach().numpy() - ref).max() < 1e-2
    assert torch.autograd.gradcheck(lambda a, b, c: ta.attention(a, b, c, backend="poly", tol=1e-2), (q, k, v))


def test_integer_chebyshev_coefficients_are_exactly_rational():
    from fractions import Fraction

    from scipy import special

    for beta in (1e-3, 0.37, 1.0, 4.2, 17.5):
        for deg in (0, 1, 3, 6, 11):
            cheb = [Fraction(float(special.iv(j, beta))) * (1 if j == 0 else 2) for j in range(deg + 1)]
            mono = [Fraction(0)] * (deg + 1)
            for j, a in enumerate(cheb):
                for t, c in enumerate(_chebyshev_monomials(j)):
                    mono[t] += a * c
            want = [float(c / Fraction(beta) ** t) for t, c in enumerate(mono)]
            assert list(_chebyshev_coefficients(beta, deg)) == want


def test_gradient_certificate_is_computed_on_demand():
    p = ta.plan("pairwise", n=256, d=8, bound=1.0, scale=1 / 8)
    cert = p.certificate
    assert "grad_factor" not in vars(cert)
    assert cert.grad_factor > cert.output_error > 0 and "grad_factor" in vars(cert)


def test_plans_are_reused_for_an_identical_problem_only():
    rng = np.random.default_rng(0)
    q, k, v = (rng.uniform(-1, 1, (64, 8)).astype(np.float32) for _ in range(3))
    _, a = ta.attention(q, k, v, backend="poly", return_info=True)
    _, b = ta.attention(q, k, v, backend="poly", return_info=True)
    _, c = ta.attention(q * 0.5, k, v, backend="poly", return_info=True)
    assert a.plan is b.plan and c.plan is not a.plan and c.beta < a.beta
    # a call that warns warns every time
    big = rng.uniform(-4, 4, (64, 8)).astype(np.float32)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ta.attention(big, big, v, backend="poly", scale=1.0, on_unbounded="fallback")
        assert caught
