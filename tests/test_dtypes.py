"""Dtypes and devices: fp16/bf16 inputs are upcast (features never in half precision, docs/design.md#numerics),
the output is cast back, and gradients flow back in the input dtype, on the input's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.testing import random_inputs

HALF = [torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tensors(spec, dtype, device="cpu", seed=0, n=16, d=4):
    q, k, v = random_inputs(spec, n=n, d=d, dtype=np.float32, seed=seed)

    def leaf(a):
        return torch.tensor(a, device=device).to(dtype).requires_grad_(True)

    if isinstance(k, tuple):
        return leaf(q), tuple(leaf(x) for x in k), tuple(leaf(x) for x in v)
    return leaf(q), leaf(k), leaf(v)


def _upcast(args):
    """The same (already rounded) values in float32, as fresh leaves."""
    def up(t):
        return t.detach().float().requires_grad_(True)

    return [tuple(up(x) for x in a) if isinstance(a, tuple) else up(a) for a in args]


def _flat(args):
    return [x for a in args for x in (a if isinstance(a, tuple) else (a,))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["exact", "poly"])
@pytest.mark.parametrize("spec", ["pairwise", "triple", "rope"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_inputs_upcast_and_cast_back(dtype, spec, backend, device):
    half = _tensors(spec, dtype, device)
    single = _upcast(half)
    kw = dict(spec=spec, backend=backend, tol=1e-3, on_unbounded="ignore", causal=spec != "pairwise")
    out, info = ta.attention(*half, return_info=True, **kw)
    ref_out = ta.attention(*single, **kw)
    ref = ref_out.detach()
    assert out.dtype == dtype and out.device == half[0].device
    if backend == "poly":
        assert info.feature_dtype in ("float32", "float64")  # never fp16/bf16 features
    u = torch.finfo(dtype).eps  # one rounding of a float32 result to the half format: <= u/2 relative
    assert float((out.detach().float() - ref).abs().max()) <= u * float(ref.abs().max()) + 1e-6
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(d_out.to(dtype))
    ref_out.backward(d_out.to(dtype).float())
    for a, b in zip(_flat(half), _flat(single)):
        assert a.grad.dtype == dtype and a.grad.device == a.device
        assert float((a.grad.float() - b.grad).abs().max()) <= u * float(b.grad.abs().max()) + 1e-6


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_dtypes_round_trip(dtype):
    q, k, v = random_inputs("triple", n=8, d=4, dtype=dtype)
    for backend in ("exact", "poly"):
        out = ta.attention(q, k, v, spec="triple", backend=backend, on_unbounded="ignore")
        assert isinstance(out, np.ndarray) and out.dtype == dtype


def test_float64_stays_float64_with_gradients():
    q, k, v = _tensors("pairwise", torch.float64)
    out, info = ta.attention(q, k, v, backend="poly", return_info=True)
    assert out.dtype == torch.float64 and info.feature_dtype == "float64"
    out.sum().backward()
    assert q.grad.dtype == torch.float64


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_multihead_in_half_precision(dtype):
    torch.manual_seed(0)
    mha = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend="poly", qk_norm=1.0, tol=1e-2,
                                         on_unbounded="ignore", dtype=dtype)
    x = torch.randn(2, 6, 8).to(dtype).requires_grad_(True)
    out, info = mha(x, return_info=True)
    assert out.dtype == dtype and info.feature_dtype in ("float32", "float64")
    out.float().sum().backward()
    assert x.grad.dtype == dtype and all(p.grad.dtype == dtype for p in mha.parameters())
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("backend", ["exact", "poly"])
@pytest.mark.parametrize("magnitude", [1e-41, 1e-39, 3e-38])
def test_flush_denormal_keeps_the_certificate(backend, magnitude):
    """With torch.set_flush_denormal(True) the CPU reads and writes subnormals as 0: the input
    maxima and the results below float32's normal range were off by 1e-40 against bounds of 1e-45.
    Each call keeps subnormals while it computes (forward and backward) and restores the mode."""
    from tensorattn.inputs import flushes_subnormals

    gen = torch.Generator().manual_seed(1)
    q, k = (torch.rand(1, 64, 8, generator=gen) * 2 - 1 for _ in range(2))
    v = ((torch.rand(1, 64, 8, generator=gen, dtype=torch.float64) * 2 - 1) * magnitude).float()
    reference = ta.attention(q.double(), k.double(), v.double(), backend="exact", scale=0.125)
    plain = ta.attention(q, k, v, backend=backend, scale=0.125)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        out, info = ta.attention(q, k, v, backend=backend, scale=0.125, return_info=True)
        assert flushes_subnormals()
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(out, plain)
    assert float((out.double() - reference).abs().max()) <= info.error_bound
