"""Exact backend against the float64 reference; types, shapes, streaming."""

import numpy as np
import pytest
import torch
from hypothesis import given

import tensorattn as ta
from tensorattn.testing import random_inputs, reference_attention

from .strategies import attention_cases

TOL = {np.float32: 1e-5, np.float64: 1e-10}


@given(attention_cases())
def test_exact_matches_reference(case):
    spec, q, k, v, options, causal = case
    out = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal, **options)
    ref = reference_attention(q, k, v, spec=spec, causal=causal, **options)
    assert out.dtype == q.dtype
    assert out.shape == ref.shape
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= TOL[q.dtype.type], f"exact vs float64 reference: max error {err:.3e}"


@pytest.mark.parametrize("spec", ["pairwise", "triple", "rope"])
@pytest.mark.parametrize("causal", [False, True])
def test_streaming_tiles_agree_with_one_tile(spec, causal):
    """A tiny memory budget forces many query chunks and key blocks; the result must not change."""
    q, k, v = random_inputs(spec, n=70, d=4, batch=(2,), dtype=np.float64, seed=3)
    big = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal)
    small = ta.attention(q, k, v, spec=spec, backend="exact", causal=causal, memory_budget=4096)
    np.testing.assert_allclose(small, big, atol=1e-12)
    np.testing.assert_allclose(big, reference_attention(q, k, v, spec=spec, causal=causal), atol=1e-12)


def test_large_scores_are_stable():
    """Max subtraction: scores in the hundreds must not overflow."""
    q, k, v = random_inputs("pairwise", n=32, d=8, bound=30.0, dtype=np.float32, seed=1)
    out = ta.attention(q, k, v, backend="exact")
    assert np.isfinite(out).all()
    ref = reference_attention(q, k, v)
    assert np.abs(out - ref).max() < 1e-4


def test_torch_in_torch_out_dtype_device_and_lead():
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    out = ta.attention(q, k, v, backend="exact")
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, 10, 4) and out.dtype == torch.float32 and out.device == q.device
    ref = reference_attention(q.numpy(), k.numpy(), v.numpy())
    assert np.abs(out.numpy() - ref).max() < 1e-5
    ref_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - ref_sdpa).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    q, k, v = (torch.randn(7, 4).to(dtype) for _ in range(3))
    out = ta.attention(q, k, v, backend="exact")
    assert out.dtype == dtype
    ref = reference_attention(q.float().numpy(), k.float().numpy(), v.float().numpy())
    assert np.abs(out.float().numpy() - ref).max() < 1e-2


def test_numpy_float16_roundtrip():
    q, k, v = random_inputs("pairwise", n=9, d=4, dtype=np.float16)
    out = ta.attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16


def test_cross_attention_m_ne_n():
    q, k, v = random_inputs("triple", n=5, m=9, d=3, batch=(2,), dtype=np.float64)
    out = ta.attention(q, k, v, spec="triple", backend="exact")
    assert out.shape == (2, 5, 3)
    np.testing.assert_allclose(out, reference_attention(q, k, v, spec="triple"), atol=1e-12)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = random_inputs("pairwise", n=6, d=16, dtype=np.float64)
    a = ta.attention(q, k, v, backend="exact")
    b = ta.attention(q, k, v, backend="exact", scale=0.25)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_n_zero_returns_empty():
    q = np.zeros((2, 0, 4), np.float32)
    k = v = np.ones((2, 5, 4), np.float32)
    out = ta.attention(q, k, v)
    assert out.shape == (2, 0, 4) and out.dtype == np.float32


def test_return_info_exact():
    q, k, v = random_inputs("pairwise", n=8, d=4)
    out, info = ta.attention(q, k, v, backend="exact", return_info=True)
    assert info.backend == "exact" and info.spec == "pairwise"
    # exact's certificate is its float32 roundoff: small, and it holds against the float64 reference
    assert 0.0 < info.error_bound < 1e-4
    assert np.abs(out - reference_attention(q, k, v)).max() <= info.error_bound
    assert info.order == 2 and info.flops == info.flops_exact > 0
    assert info.threshold == pytest.approx(np.sqrt(np.log(8)))


def test_deterministic():
    q, k, v = random_inputs("triple", n=12, d=4)
    a = ta.attention(q, k, v, spec="triple", backend="exact")
    b = ta.attention(q, k, v, spec="triple", backend="exact")
    assert np.array_equal(a, b)


def test_value_einsum_outer_product():
    spec = ta.Spec("outer", "id,jd,kd->ijk", value="je,kf->ief")
    q, k, v = random_inputs(spec, n=6, d=3, e=2, dtype=np.float64)
    out = ta.attention(q, k, v, spec=spec, backend="exact")
    assert out.shape == (6, 2, 2)
    np.testing.assert_allclose(out, reference_attention(q, k, v, spec=spec), atol=1e-12)


def test_k_sequence_of_one_for_pairwise():
    q, k, v = random_inputs("pairwise", n=6, d=3, dtype=np.float64)
    np.testing.assert_allclose(ta.attention(q, (k,), (v,)), ta.attention(q, k, v))


def test_python_lists_are_accepted_as_numpy():
    q = [[0.1, 0.2], [0.3, -0.4]]
    out = ta.attention(q, q, q, backend="exact")
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, reference_attention(np.array(q), np.array(q), np.array(q)), atol=1e-12)
