"""Edge cases of the public API, one test each: degenerate sizes, unsupported dtypes, overflow-prone
magnitudes, the certificate in half precision, double backward, argument checks, the order cap,
the command line, and the wording of the error messages."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.cli import EXIT_ERROR, main
from tensorattn.testing import random_inputs, random_rel, reference_attention

rng = np.random.default_rng(0)
Q, K = (rng.uniform(-0.5, 0.5, (4, 2)).astype(np.float32) for _ in range(2))
V = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
W = rng.uniform(-0.5, 0.5, (7, 2, 2)).astype(np.float32)


def _message(cls, fn, *args, **kwargs) -> str:
    with pytest.raises(cls) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --- sizes


@pytest.mark.parametrize("backend", ["auto", "exact", "poly", "sdpa", "favor", "taylor2"])
def test_feature_size_zero_is_an_input_error(backend):
    z = np.zeros((4, 0), np.float32)
    msg = _message(ta.InputError, ta.attention, z, z, V, backend=backend, scale=1.0)
    assert "feature index 'd'" in msg and "size 0" in msg
    assert "d=0 must be an int >= 1" in _message(ta.InputError, ta.plan, "pairwise", n=64, d=0, bound=1.0)


@pytest.mark.parametrize("backend", ["auto", "exact", "poly", "sdpa", "favor", "taylor2"])
def test_empty_batch_gives_an_empty_result(backend):
    q = k = np.zeros((0, 4, 2), np.float32)
    v = np.zeros((0, 4, 3), np.float32)
    out = ta.attention(q, k, v, backend=backend)
    assert out.shape == (0, 4, 3) and out.dtype == np.float32
    rel = ta.attention(q, k, v, spec="relative", rel=W, backend="poly")
    assert rel.shape == (0, 4, 3)


@pytest.mark.parametrize("backend", ["exact", "poly", "taylor2"])
def test_empty_values_give_an_empty_result(backend):
    z = np.zeros((4, 0), np.float32)
    out = ta.attention(Q, K, z, backend=backend, causal=True)
    assert out.shape == (4, 0) and out.dtype == np.float32
    assert ta.attention(Q, K, z, spec="relative", rel=W, backend="poly").shape == (4, 0)
    # a summed value index of size 0: every output entry is a sum over nothing
    summed = ta.Spec("summed", "iab,jab->ij", value="jef->ie")
    q, k = rng.uniform(-0.5, 0.5, (5, 1, 2)), rng.uniform(-0.5, 0.5, (3, 1, 2))
    out = ta.attention(q, k, np.zeros((3, 4, 0)), spec=summed, backend=backend)
    assert out.shape == (5, 4) and not out.any()


def test_empty_values_keep_gradients():
    q, k = (torch.tensor(x, requires_grad=True) for x in (Q, K))
    out = ta.attention(q, k, torch.zeros(4, 0), backend="poly")
    out.sum().backward()
    assert q.grad is not None and not q.grad.any()


# --- dtypes and containers


@pytest.mark.parametrize("bad", [
    Q.astype(str), (Q * 100).astype("int64").astype("datetime64[s]"),
    np.zeros((4, 2), dtype=[("x", "f4"), ("y", "f4")]), Q.astype(np.longdouble), Q.astype(np.complex64),
], ids=["str", "datetime64", "structured", "longdouble", "complex64"])
def test_unsupported_numpy_dtypes(bad):
    msg = _message(ta.InputError, ta.attention, bad, K, V)
    assert msg.startswith(f"q has dtype {bad.dtype}") and "supported dtypes are float16, bfloat16" in msg


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.int32, torch.bool],
                         ids=str)
def test_unsupported_torch_dtypes(dtype):
    msg = _message(ta.InputError, ta.attention, torch.tensor(Q).to(dtype), torch.tensor(K), torch.tensor(V))
    assert f"q has dtype {dtype}" in msg and "supported dtypes" in msg


def test_meta_sparse_nested_and_masked_inputs():
    t = torch.tensor(Q)
    assert "meta tensor" in _message(ta.InputError, ta.attention, *(torch.empty(4, 2, device="meta"),) * 3)
    assert "to_dense()" in _message(ta.InputError, ta.attention, t.to_sparse(), t, torch.tensor(V))
    with warnings.catch_warnings():  # torch says nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([t])
    assert "nested tensor" in _message(ta.InputError, ta.attention, nested, t, t)
    masked = np.ma.masked_array(Q, mask=Q > 0)
    assert "masked array" in _message(ta.InputError, ta.attention, masked, K, V)


def test_reversed_length_one_axis():
    out = ta.attention(Q[:1][::-1], K[:1], V[:1])
    np.testing.assert_allclose(out, V[:1], rtol=1e-6)


# --- scalars


def test_numpy_scalars_are_numbers():
    base = ta.attention(Q, K, V, scale=0.125, tol=1e-2, backend="poly")
    out = ta.attention(Q, K, V, scale=np.float32(0.125), tol=np.float32(1e-2), backend="poly")
    np.testing.assert_array_equal(out, base)
    assert ta.Request(q_offset=np.int64(2), max_degree=np.int32(9)).q_offset == 2


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(scale=True), "scale=True must be a finite number (a bool is not a number)"),
    (dict(causal="yes"), "causal='yes' must be True or False (got str)"),
    (dict(memory_budget=-5), "memory_budget=-5 must be an int >= 1"),
    (dict(spec="rope", rope_base=math.inf), "rope_base=inf must be a finite number"),
    (dict(q_offset=2**70), "q_offset=1180591620717411303424 must be an int >= 0 and <= 9,007,199,254,740,992"),
    (dict(max_degree=10**9), "max_degree=1000000000 must be an int >= 0 and <= 100"),
    (dict(return_info="yes"), "return_info='yes' must be True or False"),
])
def test_bad_settings_are_refused(kwargs, fragment):
    assert fragment in _message(ta.InputError, ta.attention, Q, K, V, **kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n=-5, d=8), "n=-5 must be an int >= 1"),
    (dict(n=64, d=0), "d=0 must be an int >= 1"),
    (dict(n=1024.0, d=8), "n=1024.0 must be an int >= 1 and <= 9,007,199,254,740,992 (got a float; pass 1024)"),
    (dict(n=64, m=2000, d=8, causal=True), "causal=True needs as many keys as queries"),
    (dict(n=64, d=8, sizes=[8]), "sizes=[8] must be a dict"),
    (dict(n=64, d=8, dtype="int8"), "dtype='int8' must be one of"),
    (dict(n=1, d=[8], sizes={"d": 2}), "d=[8] must be an int >= 1"),  # d is checked even beside sizes
])
def test_plan_arguments(kwargs, fragment):
    assert fragment in _message(ta.InputError, ta.plan, "pairwise", bound=1.0, **kwargs)


def test_plan_half_dtypes_include_the_cast():
    p32 = ta.plan("pairwise", n=4096, d=8, bound=1.0, scale=1 / 8, backend="poly")
    p16 = ta.plan("pairwise", n=4096, d=8, bound=1.0, scale=1 / 8, backend="poly", dtype="bfloat16")
    assert p16.degree == p32.degree  # the degree is chosen for tol, in the compute dtype
    assert p16.error_bound == pytest.approx(p32.error_bound + 2.0**-8 * (1 + p32.error_bound), rel=1e-6)


# --- overflow-prone magnitudes


@pytest.mark.parametrize("backend", ["exact", "auto", "sdpa"])
def test_huge_entries_give_finite_correct_results(backend):
    q, k = Q * np.float32(1e20), K * np.float32(1e20)
    out = ta.attention(q, k, V, backend=backend)
    ref = reference_attention(q, k, V)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_huge_scale_and_slope_give_finite_correct_results():
    out, info = ta.attention(Q, K, V, backend="exact", scale=1e39, return_info=True)
    assert np.isfinite(out).all() and np.abs(out - reference_attention(Q, K, V, scale=1e39)).max() <= info.error_bound
    for k, v, w in [(K, V, W), (K[:3], V[:3], W[:6])]:  # the second has a query past the last key
        out = ta.attention(Q, k, v, spec="relative", rel=w, alibi_slope=1e39, backend="exact")
        ref = reference_attention(Q, k, v, spec="relative", rel=w, alibi_slope=1e39)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, atol=1e-6)
    out = ta.attention(Q, K[:3], V[:3], spec="relative", rel=W[:6], alibi_slope=1e39)  # auto: poly refuses, exact runs
    assert np.isfinite(out).all()


def test_scores_past_float64_are_refused():
    q = np.full((3, 2), 1e200)
    msg = _message(ta.InputError, ta.attention, q, q, q, backend="exact")
    assert "may exceed float64's range" in msg


def test_poly_with_unbalanced_operands():
    # tiny q, huge k, scores of size ~1: the monomials are rescaled, so nothing overflows
    q = rng.uniform(-1, 1, (16, 4)).astype(np.float32) * np.float32(1e-18)
    k = rng.uniform(-1, 1, (16, 4)).astype(np.float32) * np.float32(1e18)
    v = rng.uniform(-1, 1, (16, 4)).astype(np.float32)
    out, info = ta.attention(q, k, v, backend="poly", return_info=True)
    assert np.abs(out - reference_attention(q, k, v)).max() <= info.error_bound


# --- the certificate covers the cast to the caller's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["poly", "exact"])
def test_half_precision_certificate(dtype, backend):
    worst = 0.0
    for seed in range(12):
        q, k, v = (torch.tensor(x).to(dtype) for x in random_inputs("pairwise", n=32, d=4, seed=seed))
        out, info = ta.attention(q, k, v, backend=backend, return_info=True)
        ref = reference_attention(q.double(), k.double(), v.double())
        err = float((out.double() - torch.from_numpy(ref)).abs().max())
        worst = max(worst, err / info.error_bound)
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert info.error_bound >= u * float(out.double().abs().max())  # the cast is part of the bound
    assert worst <= 1.0


def test_float64_features_cast_to_float32_are_covered():
    # tol=1e-6 needs float64 features; the float32 result is rounded once more
    q, k, v = random_inputs("triple", n=6, d=2, seed=3)
    out, info = ta.attention(q, k, v, spec="triple", backend="poly", tol=1e-6, scale=0.0, return_info=True)
    assert info.feature_dtype == "float64"
    assert np.abs(out - reference_attention(q, k, v, spec="triple", scale=0.0)).max() <= info.error_bound


# --- double backward


def test_double_backward_through_exact():
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 2, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3)]

    def f(q, k, v):
        return ta.attention(q, k, v, backend="exact", causal=True)

    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)
    # triple: a gradient penalty through exact equals the one through plain autograd softmax
    q, k1, k2, v1, v2 = (torch.randn(3, 2, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(5))

    def plain(q, k1, k2, v1, v2):
        p = torch.softmax(torch.einsum("id,jd,kd->ijk", q, k1, k2).reshape(3, -1) / 2**0.5, -1).reshape(3, 3, 3)
        return torch.einsum("ijk,je,ke->ie", p, v1, v2)

    def penalty(fn):
        out = fn(q, k1, k2, v1, v2)
        grads = torch.autograd.grad(out.square().sum(), (q, k1), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k1, k2, v1, v2))

    exact = penalty(lambda q, k1, k2, v1, v2: ta.attention(q, (k1, k2), (v1, v2), spec="triple", backend="exact"))
    for a, b in zip(exact, penalty(plain)):
        torch.testing.assert_close(a, b)


# --- the order cap


def test_many_slot_spec_is_refused_up_front():
    letters = "ijklmnopqrstuvwxyz"
    start = time.perf_counter()
    msg = _message(ta.SpecError, ta.Spec, "many", ",".join(c + "d" for c in letters) + "->" + letters)
    assert time.perf_counter() - start < 1.0
    assert "order 18" in msg and "orders up to 8" in msg and "n^(k-1) key tuples" in msg
    eight = ta.Spec("eight", ",".join(c + "d" for c in letters[:8]) + "->" + letters[:8])
    q = np.full((2, 1), 0.5)
    assert ta.attention(q, (q,) * 7, (q,) * 7, spec=eight, backend="exact").shape == (2, 1)


def test_many_slot_attention_polynomial_is_refused_unless_a_tree():
    letters = "ijklmnopqrstuvwxyA"
    path = [f"{a}z,{b}z->{a}{b}" for a, b in zip(letters, letters[1:])]
    start = time.perf_counter()
    msg = _message(ta.SpecError, ta.Spec, "ring", " + ".join(path + [f"{letters[-1]}z,{letters[0]}z->{letters[-1]}i"]))
    assert time.perf_counter() - start < 1.0
    assert "18 token slots" in msg and "cycle" in msg and "tree of pairwise terms" in msg
    tree = ta.Spec("path18", " + ".join(path))  # a tree: exact by message passing in quadratic time
    q = np.full((3, 2), 0.5)
    assert ta.attention(q, (q,) * 17, (q,) * 17, spec=tree, backend="exact").shape == (3, 2)


# --- messages


def test_message_causal_triple_with_mismatched_lengths():
    q, k, v = random_inputs("triple", n=3, m=5, d=2)
    msg = _message(ta.InputError, ta.attention, q, k, v, spec="triple", causal=True)
    assert "pass q_offset=2 (= m - n" in msg and "m=5" in msg
    k2 = (k[0], k[1][:4])
    msg = _message(ta.InputError, ta.attention, q, k2, (v[0], v[1][:4]), spec="triple", causal=True)
    assert "m=(5, 4)" in msg and "q_offset=2" in msg
    few = _message(ta.InputError, ta.attention, Q, K[:2], V[:2], causal=True)
    assert "q_offset=0" in few and "fewer keys than queries" in few


def test_message_for_a_scalar():
    assert "q is a scalar (0.5)" in _message(ta.InputError, ta.attention, 0.5, K, V)
    assert "v is a scalar" in _message(ta.InputError, ta.attention, Q, K, np.float32(2))
    assert "q is a scalar (0-dim tensor)" in _message(ta.InputError, ta.attention, torch.tensor(0.5), K, V)


def test_message_for_a_huge_einsum():
    expr = "i" + "d" * 100_000 + ",jd->ij"
    msg = _message(ta.SpecError, ta.Spec, "huge", expr)
    assert len(msg) < 300 and msg.count("(100,010 characters)") == 1 and "repeats index 'd'" in msg


def test_message_pairwise_with_a_tuple_of_keys():
    msg = _message(ta.InputError, ta.attention, Q, (K, K), (V, V))
    assert "spec 'pairwise' has order 2 and takes one k array" in msg and "spec='triple'" in msg


# --- command line


@pytest.mark.parametrize("argv", [
    ["check", "--n", "-5", "--d", "8", "--B", "1"],
    ["check", "--n", "64", "--d", "0", "--B", "1"],
    ["check", "--n", "64", "--d", "8", "--B", "nan"],
    ["check", "--n", "64", "--d", "8", "--B", "inf"],
    ["check", "--n", "64", "--d", "8", "--B", "1", "--scale", "nan"],
    ["check", "--n", "64", "--d", "8", "--B", "1", "--causal", "--m", "2000"],
    ["check", "--n", "0", "--d", "8", "--B", "1"],
    ["check", "--n", "64", "--d", "8", "--B", "1", "--tol", "0"],
    ["bench", "--backend", "nope"],
    ["bench", "--n", "0"],
    ["bench", "--tol", "0"],
    ["bench", "--B", "-1"],
    ["bench", "--threads", "-3"],
    ["bench", "--spec", "nope"],
], ids=lambda a: " ".join(a))
def test_cli_refuses_bad_arguments(argv, capsys, monkeypatch):
    import tensorattn.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the benchmark started"))
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1


def test_cli_check_reports_the_given_B(capsys):
    assert main(["check", "--n", "4096", "--d", "8", "--B", "1"]) == 0
    out = capsys.readouterr().out
    assert "B given: 1 (largest |entry| of q and the keys)" in out
    assert "default scale 1/sqrt(d)" in out and "B_eff = (scale * D * B^2)^(1/2) = 1.682" in out
    main(["check", "--n", "4096", "--d", "8", "--B", "1", "--scale", "1/d"])
    assert "B_eff = (scale * D * B^2)^(1/2) = 1 " in capsys.readouterr().out.replace("= 1.", "= 1 ")


# --- the other public functions


def test_check_bounds_and_grad_bound_for_arguments():
    assert "needs k as a sequence of 2 arrays" in _message(ta.InputError, ta.check_bounds, Q, K, spec="triple")
    _, info = ta.attention(Q, K, V, backend="poly", return_info=True)
    assert "needs the AttentionInfo" in _message(ta.InputError, ta.grad_bound_for, "info", V)
    assert "d_out contains 1 non-finite" in _message(ta.InputError, ta.grad_bound_for, info, np.array([[np.nan]]))
    assert "attend needs a ta.Spec and a ta.Request" in _message(ta.InputError, ta.attend, "pairwise", Q, K, V, {})


def test_module_arguments_and_inputs():
    assert "kdim=0 must be an int >= 1" in _message(ta.InputError, ta.nn.MultiheadTensorAttention, 8, 2, kdim=0)
    assert "dtype=torch.int64" in _message(ta.InputError, ta.nn.MultiheadTensorAttention, 8, 2, dtype=torch.int64)
    mha = ta.nn.MultiheadTensorAttention(4, 2)
    assert "query has 5 features" in _message(ta.InputError, mha, torch.randn(1, 3, 5))
    assert "torch.float64 on cpu but the parameters are torch.float32" in _message(
        ta.InputError, mha, torch.randn(1, 3, 4, dtype=torch.float64))
    rel = ta.nn.TensorAttention("relative", rel=random_rel(3, 3, 2), backend="exact")
    assert rel(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)).shape == (3, 2)


@pytest.mark.parametrize("backend", ["exact", "poly", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("spec", [ta.Spec("biased", "id,jd->ij + jd,kd->jk + kd->k"), "tree", "strassen",
                                  ta.Spec("star", "id,jd->ij + id,kd->ik")])
def test_scale_past_the_dtype_range_on_zero_keys(spec, causal, backend):
    """A scale beyond float32's range (1e39) with zero keys: every score is 0, so the result is
    finite and within the bound (the scale once overflowed to inf in float32 and inf * 0 gave NaN)."""
    rng = np.random.default_rng(3)
    q = rng.uniform(-1, 1, (4, 2)).astype(np.float16)
    ks = tuple(np.zeros((4, 2), np.float16) for _ in range(2))
    vs = tuple(rng.uniform(-1, 1, (4, 1)).astype(np.float16) for _ in range(2))
    out, info = ta.attention(q, ks, vs, spec=spec, backend=backend, causal=causal, scale=1e39, tol=0.1,
                             return_info=True)
    want = reference_attention(q, ks, vs, spec=spec, causal=causal, scale=1e39)
    assert np.isfinite(out.astype(np.float64)).all()
    assert np.abs(out.astype(np.float64) - want).max() <= info.error_bound


@pytest.mark.parametrize("backend", ["exact", "auto"])
@pytest.mark.parametrize("values", [(-0.0, 6.3e199, 2.1e199), (0.5, 3e200, 2e-200)])
def test_value_rescaling_never_overflows_on_the_way_back(backend, values):
    """Values far from 1 run as values near 1 and are scaled back by the product of powers of two:
    that product alone may overflow float64 (1e200 * 1e200) while the result is 0 or near 1 (it
    once came back as 0 * inf = NaN)."""
    spec = ta.Spec("quad", "id,jd,kd,ld->ijkl")
    rng = np.random.default_rng(5)
    q = rng.uniform(-1, 1, (2, 1))
    ks = [rng.uniform(-1, 1, (2, 1)) for _ in range(3)]
    vs = [np.full((2, 1), x) for x in values]
    out, info = ta.attention(q, ks, vs, spec=spec, backend=backend, causal=True, tol=0.1, return_info=True)
    want = reference_attention(q, ks, vs, spec=spec, causal=True)
    assert np.isfinite(out).all()
    assert np.abs(out - want).max() <= info.error_bound


@pytest.mark.parametrize("backend", ["exact", "auto"])
def test_gradient_overflow_is_an_input_error_from_backward(backend):
    """Values near float32's largest number give a finite output but gradients past the range: the
    backward raises an InputError that names the dtype, the limit and the fix, instead of returning
    inf to the optimizer."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 2, generator=gen) * 3).requires_grad_()
    k = (torch.randn(1, 4, 2, generator=gen) * 3).requires_grad_()
    v = torch.rand(1, 4, 2, generator=gen) * 1e37
    out = ta.attention(q, k, v, backend=backend, scale=1.0)
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ta.InputError, match=r"overflowed torch.float32's largest finite number .*Fix: rescale"):
        (out * 100).sum().backward()
