"""Every bad input raises a TensorAttnError subclass whose message names operand, values and fix."""

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.testing import random_inputs, random_rel


def _raises(cls, *fragments, **kwargs):
    with pytest.raises(cls) as err:
        ta.attention(**kwargs)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in message: {msg}"
    assert isinstance(err.value, ta.TensorAttnError) and isinstance(err.value, ValueError)
    return msg


def test_error_hierarchy():
    for cls in (ta.SpecError, ta.InputError, ta.BoundError):
        assert issubclass(cls, ta.TensorAttnError)
    assert issubclass(ta.TensorAttnError, ValueError)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(where, bad):
    q, k, v = random_inputs("pairwise", n=5, d=3)
    arrays = {"q": q, "k": k, "v": v}
    arrays[where][2, 1] = bad
    _raises(ta.InputError, f"{where} contains 1 non-finite entry", "(2, 1)", "Fix", **arrays)


def test_non_finite_in_second_key_slot_of_triple():
    q, (k1, k2), v = random_inputs("triple", n=5, d=3)
    k2 = k2.copy()
    k2[0, 0] = np.nan
    _raises(ta.InputError, "k[1] contains", "NaN/Inf", q=q, k=(k1, k2), v=v, spec="triple")


def test_non_finite_torch():
    q, k, v = (torch.randn(4, 3) for _ in range(3))
    q[1, 1] = float("nan")
    _raises(ta.InputError, "q contains 1 non-finite", q=q, k=k, v=v)


def test_mismatched_d():
    q, k, v = random_inputs("pairwise", n=5, d=3)
    _raises(ta.InputError, "size of index 'd' for k (4)", "previous operands (3)",
            q=q, k=np.ones((5, 4), np.float32), v=v)


def test_mismatched_leading_dims():
    q, k, v = random_inputs("pairwise", n=5, d=3, batch=(2,))
    _raises(ta.InputError, "leading (batch/head) dims of k are (3,) but q has (2,)", "Fix",
            q=q, k=np.ones((3, 5, 3), np.float32), v=v)


def test_value_shape_mismatch():
    q, k, v = random_inputs("pairwise", n=5, d=3)
    _raises(ta.InputError, "v has shape (4, 3)", "the 5 tokens of k", q=q, k=k, v=v[:4])


def test_wrong_number_of_keys_for_triple():
    q, (k1, k2), (v1, v2) = random_inputs("triple", n=5, d=3)
    _raises(ta.InputError, "order 3 and needs 2 k array(s), got 3", "k=(k1, k2)",
            q=q, k=(k1, k2, k2), v=(v1, v2), spec="triple")
    _raises(ta.InputError, "needs k as a sequence of 2 arrays", q=q, k=k1, v=(v1, v2), spec="triple")
    _raises(ta.InputError, "needs 2 v array(s), got 1", q=q, k=(k1, k2), v=(v1,), spec="triple")


def test_causal_with_m_ne_n():
    q, k, v = random_inputs("pairwise", n=4, m=6, d=3)
    _raises(ta.InputError, "causal=True needs as many keys as queries", "n=4", "m=6", "pass q_offset=2 (= m - n",
            q=q, k=k, v=v, causal=True)


def test_empty_keys():
    q = np.ones((3, 2), np.float32)
    k = v = np.ones((0, 2), np.float32)
    _raises(ta.InputError, "k has 0 tokens", "pass at least one key", q=q, k=k, v=v)


def test_unknown_spec_backend_option():
    q, k, v = random_inputs("pairwise", n=4, d=2)
    _raises(ta.SpecError, "unknown spec 'pairs'", "'pairwise'", q=q, k=k, v=v, spec="pairs")
    _raises(ta.InputError, "unknown backend 'fast'", "'exact'", "'poly'", "'auto'", q=q, k=k, v=v, backend="fast")
    _raises(ta.InputError, "unknown option 'rope_bse'", "'max_degree'", q=q, k=k, v=v, rope_bse=1.0)
    _raises(ta.InputError, "unknown option 'rope_base' for spec 'pairwise'", q=q, k=k, v=v, rope_base=1.0)
    _raises(ta.InputError, "on_unbounded='never'", q=q, k=k, v=v, on_unbounded="never")
    _raises(ta.InputError, "tol=2", q=q, k=k, v=v, tol=2)
    _raises(ta.InputError, "approximant='pade'", "'chebyshev'", q=q, k=k, v=v, backend="poly",
            approximant="pade")


def test_relative_w_shape_and_missing():
    q, k, v = random_inputs("pairwise", n=5, m=4, d=2)
    _raises(ta.InputError, "rel (W) has shape (7, 2, 2) but expected (8, 2, 2)", "(q_offset+n+m-1, d, d)",
            q=q, k=k, v=v, spec="relative", rel=np.zeros((7, 2, 2)))
    _raises(ta.InputError, "needs rel=W with shape (8, 2, 2)", q=q, k=k, v=v, spec="relative")
    W = random_rel(5, 4, 2)
    W[3, 0, 1] = np.nan
    _raises(ta.InputError, "rel contains 1 non-finite", q=q, k=k, v=v, spec="relative", rel=W)


def test_rope_options():
    q, k, v = random_inputs("rope", n=5, d=4)
    _raises(ta.InputError, "rope_layout='split'", "'interleaved'", q=q, k=k, v=v, spec="rope", rope_layout="split")
    _raises(ta.InputError, "rope_base=-1", q=q, k=k, v=v, spec="rope", rope_base=-1)
    q3, k3, v3 = random_inputs("rope", n=5, d=3)
    _raises(ta.InputError, "even head dim d", "d=3", q=q3, k=k3, v=v3, spec="rope")


def test_integer_input_and_too_few_dims():
    q, k, v = random_inputs("pairwise", n=4, d=2)
    _raises(ta.InputError, "q has dtype int64", "supported dtypes are", "astype('float32')",
            q=np.ones((4, 2), np.int64), k=k, v=v)
    _raises(ta.InputError, "q has shape (4,)", "needs at least 2 dims", q=np.ones(4, np.float32), k=k, v=v)


def test_bad_scale_and_offset():
    q, k, v = random_inputs("pairwise", n=4, d=2)
    _raises(ta.InputError, "scale=nan", q=q, k=k, v=v, scale=float("nan"))
    _raises(ta.InputError, "q_offset=-1", q=q, k=k, v=v, q_offset=-1)


def test_poly_past_threshold_raises_with_numbers():
    q, k, v = random_inputs("pairwise", n=64, d=8, bound=3.0, seed=0)
    msg = _raises(ta.BoundError, "entry bound B =", "tau_2(n) = (ln 64)^(1/2)", "SETH", "Fix",
                  q=q, k=k, v=v, backend="poly", scale=1 / 8)
    assert "order 2" in msg
