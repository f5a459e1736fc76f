"""The input layer on its own: inputs.prepare validates and converts, positional.py does the
position maths. One test per validation branch, and the layout of the Operands it returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.inputs import prepare
from tensorattn.request import Request
from tensorattn.testing import random_inputs, random_rel

PAIR, TRIPLE, ROPE, REL = (ta.get_spec(s) for s in ("pairwise", "triple", "rope", "relative"))


def _prep(spec, q, k, v, request=None, **options):
    return prepare(spec, q, k, v, request or Request(), options)


def _raises(fragment, spec, q, k, v, request=None, **options):
    with pytest.raises(ta.InputError) as err:
        _prep(spec, q, k, v, request, **options)
    assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_operands_layout_and_restore():
    q, k, v = random_inputs("pairwise", n=5, m=7, d=4, e=3, batch=(2, 3), dtype=np.float32)
    ops = _prep(PAIR, q, k, v)
    assert ops.q.shape == (6, 5, 4) and ops.keys[0].shape == (6, 7, 4) and ops.values[0].shape == (6, 7, 3)
    assert (ops.lead, ops.n, ops.ms, ops.sizes, ops.value_sizes) == ((2, 3), 5, (7,), {"d": 4}, {"e": 3})
    assert ops.scale == 0.5 and ops.dtype == torch.float32 and ops.kind == "numpy" and ops.D == 4
    out = ops.restore(torch.zeros(6, 5, 3, dtype=torch.float64))
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 5, 3) and out.dtype == np.float32
    t = _prep(PAIR, *(torch.from_numpy(x) for x in (q, k, v)))
    assert t.kind == "torch" and isinstance(t.restore(t.q.new_zeros(6, 5, 3)), torch.Tensor)
    with pytest.raises(dataclasses_frozen_error()):
        ops.n = 3  # Operands are frozen: later layers cannot change what was validated


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_float64_anywhere_promotes_the_compute_dtype():
    q, k, v = random_inputs("pairwise", n=3, d=2)
    ops = _prep(PAIR, q, k, v.astype(np.float64))
    assert ops.q.dtype == torch.float64 and ops.out_dtype == np.float32


def test_half_inputs_compute_in_float32():
    q = torch.randn(3, 2, dtype=torch.bfloat16)
    ops = _prep(PAIR, q, q, q)
    assert ops.dtype == torch.float32 and ops.out_dtype == torch.bfloat16


def test_order2_accepts_a_one_tuple_of_keys():
    q, k, v = random_inputs("pairwise", n=3, d=2)
    assert _prep(PAIR, q, (k,), (v,)).keys[0].shape == (1, 3, 2)


def test_key_and_value_counts():
    q, k, v = random_inputs("triple", n=3, d=2)
    _raises("needs k as a sequence of 2 arrays", TRIPLE, q, k[0], v)
    _raises("needs 2 k array(s), got 3", TRIPLE, q, (*k, k[0]), v)
    _raises("needs 2 v array(s), got 1", TRIPLE, q, k, v[:1])


def test_array_conversion_errors():
    q, k, v = random_inputs("pairwise", n=3, d=2)
    _raises("q must be a numeric array, got an object array", PAIR, np.array([object()] * 6).reshape(3, 2), k, v)
    _raises("k has dtype int64; supported dtypes are float16, bfloat16 (torch), float32 and float64", PAIR, q,
            k.astype(np.int64), v)


def test_device_mismatch():
    q, k, v = (torch.from_numpy(x) for x in random_inputs("pairwise", n=3, d=2))
    _raises("k is a meta tensor", PAIR, q, torch.empty(3, 2, device="meta"), v)


def test_shape_errors():
    q, k, v = random_inputs("pairwise", n=3, m=4, d=2, e=5, batch=(2,))
    _raises("q has shape (2,) but spec 'pairwise' operand 'id' needs at least 2 dims", PAIR, q[0, 0], k, v)
    _raises("leading (batch/head) dims of k are (3,) but q has (2,)", PAIR, q, np.concatenate([k, k[:1]]), v)
    _raises("size of index 'd' for k (3) does not match previous operands (2)", PAIR, q, np.ones((2, 4, 3), "f4"), v)
    _raises("k has 0 tokens", PAIR, q, k[:, :0], v[:, :0])
    _raises("v has shape (2, 3, 5) but needs (2, 4, '*')", PAIR, q, k, v[:, :3])
    custom = ta.Spec("outer", "id,jd,kd->ijk", value="je,ke->ie")
    qt, kt, vt = random_inputs(custom, n=3, d=2, e=2)
    _raises("size of value index 'e' for v[1] (3) does not match previous value operands (2)", custom, qt, kt,
            (vt[0], np.ones((3, 3), "f4")))


def test_causal_lengths_and_offsets():
    q, k, v = random_inputs("pairwise", n=3, m=5, d=2)
    msg = _raises("causal=True needs as many keys as queries", PAIR, q, k, v, Request(causal=True))
    assert "pass q_offset=2 (= m - n" in msg
    ops = _prep(PAIR, q, k, v, Request(causal=True, q_offset=2))
    assert ops.causal and ops.q_offset == 2 and ops.q_positions().tolist() == [2, 3, 4]
    shard = prepare(PAIR, q, k, v, Request(q_offset=10), {}, k_offsets=(8,))
    assert shard.k_positions(0).tolist() == [8, 9, 10, 11, 12] and shard.k_offsets == (8,)
    assert prepare(PAIR, q, k, v, Request(), {}, k_offsets=(0,)).k_offsets == ()


def test_non_finite_inputs():
    q, k, v = random_inputs("pairwise", n=3, d=2)
    v = v.copy()
    v[1, 0] = np.inf
    _raises("v contains 1 non-finite entry (NaN/Inf), first at index (1, 0) (value inf)", PAIR, q, k, v)


def test_scale_default_and_explicit():
    q, k, v = random_inputs("pairwise", n=3, d=16)
    assert _prep(PAIR, q, k, v).scale == 0.25
    assert _prep(PAIR, q, k, v, Request(scale=-2)).scale == -2.0


def test_rope_options_and_rotation():
    q, k, v = random_inputs("rope", n=4, d=4, dtype=np.float64)
    ops = _prep(ROPE, q, k, v)
    # positions 0..3 rotated: norms kept, position 0 unchanged
    assert torch.allclose(ops.q.norm(dim=-1), torch.from_numpy(q).norm(dim=-1)[None])
    assert torch.allclose(ops.q[0, 0], torch.from_numpy(q[0]))
    _raises("rope needs an even head dim d", ROPE, *random_inputs("rope", n=4, d=3))
    _raises("rope_base=inf must be a finite number", ROPE, q, k, v, rope_base=float("inf"))
    _raises("rope_base=0 must be a finite number in [1, inf)", ROPE, q, k, v, rope_base=0)
    _raises("rope_base=0.5 must be a finite number in [1, inf)", ROPE, q, k, v, rope_base=0.5)
    _raises("rope_layout='split' is not one of 'half', 'interleaved'", ROPE, q, k, v, rope_layout="split")


def test_relative_options():
    q, k, v = random_inputs("relative", n=3, m=4, d=2)
    W = random_rel(3, 4, 2)
    ops = _prep(REL, q, k, v, rel=W, alibi_slope=0.5)
    assert ops.rel.shape == (6, 2, 2) and ops.alibi_slope == 0.5
    _raises("spec 'relative' needs rel=W with shape (6, 2, 2)", REL, q, k, v)
    _raises("rel (W) has shape (5, 2, 2) but expected (6, 2, 2)", REL, q, k, v, rel=W[:5])
    _raises("rel has dtype int64", REL, q, k, v, rel=W.astype(np.int64))
    bad = W.copy()
    bad[2, 1, 1] = np.nan
    _raises("rel contains 1 non-finite entry", REL, q, k, v, rel=bad)
    _raises("alibi_slope=-1 must be a finite number in [0", REL, q, k, v, rel=W, alibi_slope=-1)
    _raises("alibi_slope=inf", REL, q, k, v, rel=W, alibi_slope=float("inf"))


@pytest.mark.parametrize("spec", ["pairwise", "rope"])
def test_known_maxima_name_only_the_arrays_they_were_measured_on(spec):
    """prepare measures max |entry| while checking for NaN; the bounds reuse it for the very same
    arrays only: rope's rotated q and k are new arrays, measured again."""
    from tensorattn.planning import operand_maxima

    q, k, v = (torch.rand(2, 9, 4, dtype=torch.float16) * 3 for _ in range(3))
    req, opts = Request.from_call(ta.get_spec(spec))
    ops = prepare(ta.get_spec(spec), q, k, v, req, opts)
    assert ops.known_max(ops.values[0]) == float(v.abs().max())
    assert (ops.known_max(ops.q) is None) == (spec == "rope")
    mx = operand_maxima(ops)
    assert mx.linf == (float(ops.q.abs().max()), float(ops.keys[0].abs().max()))
    assert mx.vals == (float(v.abs().max()),)
