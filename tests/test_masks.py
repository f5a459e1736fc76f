"""Masks: key padding masks on every backend that serves them, general masks on exact, causal
detection, fully masked rows, and the certificate of poly under a key mask."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.testing import reference_attention

from .strategies import attention_cases

TOL = {np.float32: 2e-5, np.float64: 1e-10}


@st.composite
def key_masks(draw, shape, per_slot: int = 0):
    """A bool or float (0/-inf) key mask of ``shape`` (..., m), sometimes with fully masked rows."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    masked = rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    if draw(st.booleans()) and masked.size:
        masked.reshape(-1, shape[-1])[0] = True  # one batch row with every key masked
    if draw(st.booleans()):
        return np.where(masked, -np.inf, 0.0).astype(np.float32)
    return masked


def _key_mask_shape(q, m, spec, draw):
    lead = q.shape[: q.ndim - 1 - len(spec.score_einsum.features[0])]
    share = draw(st.booleans()) and len(lead) > 0
    return ((*lead[:-1], 1) if share else lead) + (m,)


@given(attention_cases(), st.data())
def test_exact_with_key_padding_mask_matches_reference(case, data):
    spec, q, k, v, options, causal = case
    ks = [k] if spec.order == 2 else list(k)
    m = ks[0].shape[ks[0].ndim - 1 - len(spec.score_einsum.features[1])]
    shape = _key_mask_shape(q, m, spec, data.draw)
    mask = data.draw(key_masks(shape))
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal, key_padding_mask=mask, **options)
    ref = reference_attention(q, k, v, spec=spec, causal=causal, key_padding_mask=mask, **options)
    assert np.isfinite(out).all()
    err = np.abs(out.astype(np.float64) - ref).max() if out.size else 0.0
    assert err <= TOL[q.dtype.type], f"exact with key mask vs reference: max error {err:.3e}"


@given(attention_cases(specs=["pairwise", "triple", "rope", "relative", "bilinear3", "quad"], bound=0.8),
       st.data())
def test_poly_with_key_padding_mask_within_certified_bound(case, data):
    """poly drops masked keys from numerator and normalizer: its error against exact with the same
    mask stays within info.error_bound, for every spec, causal or not."""
    spec, q, k, v, options, causal = case
    ks = [k] if spec.order == 2 else list(k)
    m = ks[0].shape[ks[0].ndim - 1 - len(spec.score_einsum.features[1])]
    mask = data.draw(key_masks(_key_mask_shape(q, m, spec, data.draw)))
    out, info = ta.attention(q, k, v, spec=spec, backend="poly", causal=causal, key_padding_mask=mask, tol=1e-3,
                             on_unbounded="ignore", return_info=True, **options)
    exact = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal, key_padding_mask=mask, **options)
    assert info.backend == "poly" and np.isfinite(out).all()
    err = float(np.abs(out.astype(np.float64) - exact.astype(np.float64)).max()) if out.size else 0.0
    # exact's own float32 rounding is not part of poly's certificate
    slack = 0.0 if q.dtype == np.float64 else 2e-5
    assert err <= info.error_bound + slack, f"{spec.name}: {err:.3e} > certified {info.error_bound:.3e}"


@pytest.mark.parametrize("spec", ["pairwise", "triple"])
def test_per_slot_key_masks_mask_a_tuple_when_any_key_is(spec):
    rng = np.random.default_rng(0)
    n, d = 9, 4
    nk = ta.get_spec(spec).order - 1
    q = rng.uniform(-1, 1, (2, n, d))
    ks = [rng.uniform(-1, 1, (2, n, d)) for _ in range(nk)]
    vs = [rng.uniform(-1, 1, (2, n, 3)) for _ in range(nk)]
    masks = [rng.random((2, n)) < 0.4 for _ in range(nk)]
    k, v, kpm = (ks[0], vs[0], masks[0]) if nk == 1 else (ks, vs, masks)
    for backend in ["exact", "poly"]:
        out = ta.attention(q, k, v, spec=spec, backend=backend, key_padding_mask=kpm, on_unbounded="ignore")
        ref = reference_attention(q, k, v, spec=spec, key_padding_mask=kpm)
        assert np.abs(out - ref).max() < (1e-10 if backend == "exact" else 1e-3)


@pytest.mark.parametrize("spec", ["pairwise", "triple"])
@pytest.mark.parametrize("float_mask", [False, True])
def test_general_mask_on_exact_streams_in_tiles(spec, float_mask):
    """A general mask (different per query) runs on exact, sliced per tile: a tiny memory budget
    (many tiles) gives the reference's result; heads share a (batch, 1, ...) mask."""
    rng = np.random.default_rng(1)
    nk = ta.get_spec(spec).order - 1
    n = 20 if nk == 1 else 9
    q = rng.uniform(-1, 1, (2, 3, n, 4))
    ks = [rng.uniform(-1, 1, (2, 3, n, 4)) for _ in range(nk)]
    vs = [rng.uniform(-1, 1, (2, 3, n, 2)) for _ in range(nk)]
    masked = rng.random((2, 1, n, *[n] * nk)) < 0.5
    mask = np.where(masked, -np.inf, rng.uniform(-2, 2, masked.shape)) if float_mask else masked
    k, v = (ks[0], vs[0]) if nk == 1 else (ks, vs)
    ref = reference_attention(q, k, v, spec=spec, attn_mask=mask)
    for budget in [1 << 26, 2048]:
        out, info = ta.attention(q, k, v, spec=spec, attn_mask=mask, memory_budget=budget, return_info=True)
        assert info.backend == "exact" and "attn_mask" in info.plan.reason
        np.testing.assert_allclose(out, ref, atol=1e-12)


def test_per_slot_attn_masks_for_an_order_3_spec():
    rng = np.random.default_rng(2)
    n = 8
    q, k1, k2 = (rng.uniform(-1, 1, (n, 4)) for _ in range(3))
    v1, v2 = (rng.uniform(-1, 1, (n, 2)) for _ in range(2))
    m1, m2 = (rng.random((n, n)) < 0.3 for _ in range(2))
    out = ta.attention(q, (k1, k2), (v1, v2), spec="triple", attn_mask=(m1, m2), backend="exact")
    ref = reference_attention(q, (k1, k2), (v1, v2), spec="triple", attn_mask=(m1, m2))
    np.testing.assert_allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_attn_mask_runs_as_causal(kind):
    n = 24
    q, k, v = (torch.rand(2, n, 4, dtype=torch.float64) * 2 - 1 for _ in range(3))
    mask = (torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64) if kind == "float"
            else torch.ones(n, n, dtype=torch.bool).triu(1))
    out, info = ta.attention(q, k, v, attn_mask=mask, backend="poly", return_info=True, scale=0.25)
    assert info.plan.causal and not info.plan.problem.attn_mask
    ref = ta.attention(q, k, v, causal=True, backend="exact", scale=0.25)
    assert float((out - ref).abs().max()) <= info.error_bound
    # causal=True (torch's is_causal hint) with the causal mask: the hint is checked, then used
    hinted = ta.attention(q, k, v, attn_mask=mask, causal=True, backend="exact", scale=0.25)
    torch.testing.assert_close(hinted, ref, atol=0, rtol=0)


def test_causal_hint_with_a_non_causal_mask_is_an_error():
    x = torch.randn(6, 4)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    mask[4, 1] = True
    with pytest.raises(ta.InputError, match=r"causal=True .* declares attn_mask to be the causal mask.*query 4, key 1"):
        ta.attention(x, x, x, attn_mask=mask, causal=True)


def test_a_mask_shared_by_every_query_runs_as_a_key_mask():
    """attn_mask of shape (..., 1, m) is a key mask: poly serves it."""
    x = torch.rand(2, 10, 4) - 0.5
    keymask = torch.rand(2, 10) < 0.4
    out, info = ta.attention(x, x, x, attn_mask=keymask[:, None, :], backend="poly", return_info=True)
    assert info.plan.problem.key_mask == "binary" and not info.plan.problem.attn_mask
    ref = ta.attention(x, x, x, key_padding_mask=keymask, backend="exact")
    assert float((out - ref).abs().max()) <= info.error_bound + 1e-6


@pytest.mark.parametrize("backend", ["exact", "poly"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zero_output_and_finite_gradients(backend, causal):
    """Left padding under a causal mask leaves the first queries with no key: output 0, no NaN,
    gradient 0 for them; the other rows match the reference."""
    torch.manual_seed(0)
    q, k, v = (torch.rand(3, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0, :4] = True  # left padding
    pad[1] = True  # nothing to attend to
    out = ta.attention(q, k, v, backend=backend, causal=causal, key_padding_mask=pad, need_grad=False)
    ref = reference_attention(q, k, v, causal=causal, key_padding_mask=pad.numpy())
    assert np.abs(out.detach().numpy() - ref).max() < (1e-12 if backend == "exact" else 1e-3)
    assert float(out[1].abs().max()) == 0.0
    if causal:
        assert float(out[0, :4].abs().max()) == 0.0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert float(q.grad[1].abs().max()) == 0.0


def test_exact_gradients_with_masks_match_autograd():
    torch.manual_seed(1)
    n = 10
    q, k, v = (torch.randn(2, n, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kpm = torch.rand(2, n) < 0.3
    am = torch.where(torch.rand(n, n) < 0.3, float("-inf"), torch.randn(n, n).double())
    out = ta.attention(q, k, v, backend="exact", key_padding_mask=kpm, attn_mask=am, memory_budget=1024)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    s = q @ k.transpose(1, 2) / math.sqrt(3) + am + torch.where(kpm, float("-inf"), 0.0)[:, None, :]
    ref = torch.nan_to_num(torch.softmax(s, -1)) @ v
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_attention_weights_match_softmax():
    torch.manual_seed(2)
    q, k = torch.randn(2, 7, 4), torch.randn(2, 9, 4)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, -3:] = True
    w = ta.attention_weights(q, k, key_padding_mask=kpm, memory_budget=512)
    s = (q @ k.transpose(1, 2)) / 2 + torch.where(kpm, float("-inf"), 0.0)[:, None]
    torch.testing.assert_close(w, torch.softmax(s, -1), atol=1e-6, rtol=0)
    with pytest.raises(ta.InputError, match="computed by the exact backend"):
        ta.attention_weights(q, k, backend="poly")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"attn_mask": np.zeros((5, 5)), "backend": "poly"}, "attn_mask gives each query its own set of keys"),
        ({"key_padding_mask": np.full(5, 0.5), "backend": "poly"}, "values other than 0 and -inf"),
        ({"key_padding_mask": np.zeros(5, dtype=bool), "backend": "sdpa"}, "backend 'sdpa' does not apply key padding"),
        ({"attn_mask": np.zeros((5, 5)), "backend": "favor"}, "attn_mask gives each query"),
        ({"key_padding_mask": np.zeros(5, dtype=np.int64)}, "dtype torch.int64; a mask is bool"),
        ({"key_padding_mask": np.zeros(4, dtype=bool)}, "last dim must be the number of keys, m=5"),
        ({"key_padding_mask": np.zeros((3, 5), dtype=bool)}, "do not broadcast to the inputs' leading dims"),
        ({"key_padding_mask": np.array([0, np.nan, 0, 0, 0])}, "holds nan at index"),
        ({"attn_mask": np.full((5, 5), np.inf)}, "holds inf at index"),
        ({"attn_mask": np.zeros((5, 4))}, r"last 2 dims must be \(n, m\)"),
    ],
)
def test_mask_errors_name_the_argument_and_the_fix(kwargs, words):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 4)).astype(np.float32)
    with pytest.raises(ta.InputError, match=words):
        ta.attention(x, x, x, **kwargs)


def test_auto_with_a_general_mask_says_why_it_runs_exact():
    x = torch.rand(1, 300, 4) - 0.5
    plan = ta.check_bounds(x, x, attn_mask=torch.rand(300, 300) < 0.5, scale=0.1)
    assert plan.backend == "exact" and plan.reason.startswith("poly does not serve this call: attn_mask")
    assert "Masks:              general attn_mask" in repr(plan)


def test_a_backend_that_does_not_apply_masks_is_never_given_one(restore_registry):
    class Plain(ta.Backend):
        name = "plain"

        def run(self, plan, ops):  # pragma: no cover - never reached with a mask
            return ops.values[0]

    ta.register_backend(Plain())
    x = torch.rand(5, 4)
    assert ta.attention(x, x, x, backend="plain").shape == (5, 4)
    with pytest.raises(ta.InputError, match="backend 'plain' does not apply key padding or attention masks"):
        ta.attention(x, x, x, backend="plain", key_padding_mask=torch.zeros(5, dtype=torch.bool))
