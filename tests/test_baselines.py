"""Baseline backends (sdpa, favor, taylor2): agreement with exact / their own formulas, determinism,
and clear errors where a baseline cannot serve a spec."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.testing import random_inputs, random_rel, reference_attention

from .strategies import CUSTOM

PAIR2 = ta.Spec("pair2", "iab,jab->ij")  # an order-2 custom spec with a matrix per token


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@st.composite
def order2_cases(draw):
    spec = draw(st.sampled_from(["pairwise", "rope"]))
    causal = draw(st.booleans())
    n = draw(st.integers(1, 40))
    m = n if causal else draw(st.integers(1, 40))
    d = draw(st.sampled_from([2, 4, 6]))
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    q, k, v = random_inputs(spec, n=n, d=d, m=m, e=draw(st.integers(1, 5)), batch=batch, bound=1.5, dtype=dtype,
                            seed=draw(st.integers(0, 2**16)))
    return spec, q, k, v, causal, dtype


@given(order2_cases())
def test_sdpa_matches_exact(case):
    spec, q, k, v, causal, dtype = case
    out, info = ta.attention(q, k, v, spec=spec, backend="sdpa", causal=causal, return_info=True)
    ref = reference_attention(q, k, v, spec=spec, causal=causal)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert out.shape == ref.shape and out.dtype == dtype
    assert _err(out, ref) <= tol, f"sdpa {spec} causal={causal}: error {_err(out, ref):.3e} > {tol:.0e}"
    assert info.backend == "sdpa" and info.error_bound is None


def test_sdpa_causal_q_offset_and_small_chunks():
    q, k, v = random_inputs("pairwise", n=300, d=8, m=300, seed=3, dtype=np.float64)
    # a tiny memory budget forces many query chunks
    out = ta.attention(q[-37:], k, v, backend="sdpa", causal=True, q_offset=263, memory_budget=4096)
    ref = reference_attention(q[-37:], k, v, causal=True, q_offset=263)
    assert _err(out, ref) <= 1e-12
    out = ta.attention(q, k, v, backend="sdpa", memory_budget=1 << 12)
    assert _err(out, reference_attention(q, k, v)) <= 1e-12


def test_sdpa_custom_order2_spec_and_torch_grad():
    rng = np.random.default_rng(1)
    q, k = rng.uniform(-1, 1, (2, 20, 2, 3)), rng.uniform(-1, 1, (2, 25, 2, 3))
    v = rng.uniform(-1, 1, (2, 25, 4))
    assert _err(ta.attention(q, k, v, spec=PAIR2, backend="sdpa"), reference_attention(q, k, v, spec=PAIR2)) <= 1e-12
    qt = torch.tensor(q, requires_grad=True)
    out = ta.attention(qt, torch.tensor(k), torch.tensor(v), spec=PAIR2, backend="sdpa")
    out.sum().backward()
    assert qt.grad is not None and bool(torch.isfinite(qt.grad).all())


def _favor_error(features: int, seeds=(0, 1, 2)) -> float:
    q, k, v = random_inputs("pairwise", n=256, d=8, seed=5, dtype=np.float64)
    ref = reference_attention(q, k, v, scale=1 / 8)
    return float(np.mean([_err(ta.attention(q, k, v, backend="favor", scale=1 / 8, features=features, seed=s), ref)
                          for s in seeds]))


def test_favor_error_decreases_with_features():
    errors = [_favor_error(r) for r in (16, 256, 4096)]
    assert errors[0] > errors[1] > errors[2], f"FAVOR+ errors by features 16/256/4096: {errors}"
    assert errors[2] < 1e-2


def test_favor_is_deterministic_in_seed_and_causal_close():
    q, k, v = random_inputs("pairwise", n=64, d=4, batch=(2,), seed=2)
    a = ta.attention(q, k, v, backend="favor", features=64, seed=7)
    b = ta.attention(q, k, v, backend="favor", features=64, seed=7)
    c = ta.attention(q, k, v, backend="favor", features=64, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    out = ta.attention(q, k, v, backend="favor", causal=True, features=2048)
    ref = reference_attention(q, k, v, causal=True)
    assert np.isfinite(out).all() and _err(out, ref) < 0.1


def test_favor_negative_scale_and_rope():
    q, k, v = random_inputs("rope", n=48, d=4, seed=4, dtype=np.float64)
    for spec, scale in (("rope", -0.5), ("pairwise", -0.5)):
        out = ta.attention(q, k, v, spec=spec, backend="favor", scale=scale, features=4096)
        assert _err(out, reference_attention(q, k, v, spec=spec, scale=scale)) < 0.05


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many", True])
def test_favor_rejects_bad_features(bad):
    q, k, v = random_inputs("pairwise", n=8, d=4)
    with pytest.raises(ta.InputError, match="features="):
        ta.attention(q, k, v, backend="favor", features=bad)


def _taylor2_reference(q, ks, vs, scale, causal=False):
    """1 + s + s^2/2 weights on the full score tensor, normalized over key tuples (numpy)."""
    q = np.asarray(q, np.float64)
    ks = [np.asarray(k, np.float64) for k in ks]
    vs = [np.asarray(v, np.float64) for v in vs]
    if len(ks) == 1:
        s = scale * q @ ks[0].T
        w = 1 + s + s * s / 2
        if causal:
            w = np.tril(w)
        return (w @ vs[0]) / w.sum(1, keepdims=True)
    s = scale * np.einsum("id,jd,kd->ijk", q, ks[0], ks[1])
    w = 1 + s + s * s / 2
    if causal:
        n = q.shape[0]
        idx = np.arange(n)
        w = w * ((idx[None, :, None] <= idx[:, None, None]) & (idx[None, None, :] <= idx[:, None, None]))
    return np.einsum("ijk,je,ke->ie", w, vs[0], vs[1]) / w.sum((1, 2))[:, None]


@pytest.mark.parametrize("causal", [False, True])
def test_taylor2_matches_its_formula(causal):
    q, k, v = random_inputs("pairwise", n=50, d=6, seed=1, bound=2.0, dtype=np.float64)
    out, info = ta.attention(q, k, v, backend="taylor2", scale=0.3, causal=causal, return_info=True)
    assert _err(out, _taylor2_reference(q, [k], [v], 0.3, causal)) <= 1e-12
    assert info.error_bound is None
    q, k, v = random_inputs("triple", n=14, d=3, seed=2, bound=1.5, dtype=np.float64)
    out = ta.attention(q, k, v, spec="triple", backend="taylor2", scale=0.4, causal=causal)
    assert _err(out, _taylor2_reference(q, k, v, 0.4, causal)) <= 1e-12


def test_taylor2_custom_spec_runs_and_is_close_to_exact_for_small_scores():
    rng = np.random.default_rng(0)
    qa, kb, kab = rng.uniform(-1, 1, (16, 2)), rng.uniform(-1, 1, (16, 2)), rng.uniform(-1, 1, (16, 2, 2))
    va, vb = rng.uniform(-1, 1, (16, 3)), rng.uniform(-1, 1, (16, 3))
    out = ta.attention(qa, (kb, kab), (va, vb), spec=CUSTOM, backend="taylor2", scale=0.05)
    ref = reference_attention(qa, (kb, kab), (va, vb), spec=CUSTOM, scale=0.05)
    assert _err(out, ref) < 1e-3  # |s| <= 0.2: the degree-2 kernel is within e^|s| - (1 + s + s^2/2)


@pytest.mark.parametrize("backend", ["sdpa", "favor"])
def test_order2_baselines_refuse_triple_with_alternatives(backend):
    q, k, v = random_inputs("triple", n=8, d=4)
    with pytest.raises(ta.InputError) as exc:
        ta.attention(q, k, v, spec="triple", backend=backend)
    msg = str(exc.value)
    assert f"backend={backend!r} cannot serve spec 'triple'" in msg
    assert "'exact'" in msg and "'poly'" in msg and "'taylor2'" in msg and "2 key slots" in msg


@pytest.mark.parametrize("backend", ["sdpa", "favor", "taylor2"])
def test_baselines_refuse_relative(backend):
    q, k, v = random_inputs("pairwise", n=8, d=4)
    with pytest.raises(ta.InputError, match=r"cannot serve spec 'relative'.*i - j.*Backends that can: 'exact'"):
        ta.attention(q, k, v, spec="relative", backend=backend, rel=random_rel(8, 8, 4))


def test_sdpa_refuses_value_einsum_it_cannot_express():
    spec = ta.Spec("summed_values", "id,jd->ij", value="je->i")
    q, k = random_inputs("pairwise", n=6, d=4)[:2]
    v = np.ones((6, 3), np.float32)
    with pytest.raises(ta.InputError, match="value einsum"):
        ta.attention(q, k, v, spec=spec, backend="sdpa")


def test_unknown_backend_lists_baselines():
    q, k, v = random_inputs("pairwise", n=4, d=2)
    with pytest.raises(ta.InputError, match=r"unknown backend 'favour'.*'favor'.*'sdpa'.*'taylor2'"):
        ta.attention(q, k, v, backend="favour")


def test_baselines_registered():
    assert {"sdpa", "favor", "taylor2"} <= set(ta.BACKENDS)
    assert not any(ta.get_backend(b).certified for b in ("sdpa", "favor", "taylor2"))
