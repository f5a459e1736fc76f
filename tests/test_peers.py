"""Numerical agreement with the peer packages (the optional extra ``peers``): strassen-attention's
``strassen_attend`` and poly-attention's ``reference_poly_attention``. Skipped when they are absent.

Both take (batch, heads, n, d) arrays, as ``ta.attention`` does (leading dims are batch dims).
Their definitions differ from ours in ways a mapping of the inputs undoes:

* ``strassen_attend`` scales only q by sigma = d^-1/2, so its score is sigma<q,k1> + <k1,k2> +
  sigma<q,k2>; ours is s(<q,k1> + <k1,k2> + <k2,q>). With a = sqrt(s), passing q a / sigma, k1 a,
  k2 a gives ours. Values combine as v1_j * v2_k in both. Causal: j <= i and k <= i in both.
* ``reference_poly_attention(q1, q2, q2, q3, v3)`` is the tree i-j-k with both terms scaled by
  sigma and a value on the leaf only: ours with v1 = 1 after q1 = q s / sigma, q3 = k2 s / sigma.
  Its returned (lse23, msg) give ours for a general v1 with one more pass. Causal: k <= j <= i.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tensorattn as ta


def _inputs(b=2, h=3, n=12, d=4, e=3, bound=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)

    return draw(b, h, n, d), (draw(b, h, n, d), draw(b, h, n, d)), (draw(b, h, n, e), draw(b, h, n, e))


def _strassen_peer(q, k, v, scale, causal=False):
    strassen_attend = pytest.importorskip("strassen_attention").strassen_attend
    d = q.shape[-1]
    a, sigma = math.sqrt(scale), d**-0.5
    return strassen_attend(q * (a / sigma), k[0] * a, k[1] * a, v[0], v[1], causal=causal)


def _tree_peer(q, k, v2, scale, causal=False):
    reference_poly_attention = pytest.importorskip("poly_attention.poly_attention").reference_poly_attention
    c = scale / q.shape[-1] ** -0.5
    return reference_poly_attention(q * c, k[0], k[0], k[1] * c, v2, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.5, 0.2])
def test_strassen_exact_agrees_with_strassen_attend(scale, causal):
    q, k, v = _inputs(d=8, e=5, bound=2.0)
    theirs = _strassen_peer(q, k, v, scale, causal)
    ours = ta.attention(q, k, v, spec="strassen", scale=scale, causal=causal, backend="exact")
    assert ours.shape == theirs.shape == (2, 3, 12, 5)
    assert float((ours - theirs).abs().max()) < 1e-12


def test_strassen_poly_within_its_bound_of_strassen_attend():
    q, k, v = _inputs(n=16, d=4)
    theirs = _strassen_peer(q, k, v, 0.25)
    ours, info = ta.attention(q, k, v, spec="strassen", scale=0.25, backend="poly", return_info=True)
    assert float((ours - theirs).abs().max()) <= info.error_bound


def test_strassen_large_scores_stay_finite_in_float32():
    """<k1, k2> = 128 makes exp overflow float32 without a max shift (strassen_attend returns NaN
    there); ours shifts every factor by a maximum and matches the peer run in float64."""
    q, k, v = _inputs(b=1, h=1, n=16, d=8, seed=1)
    k = (torch.full_like(k[0], 4.0), torch.full_like(k[1], 4.0))
    theirs64 = _strassen_peer(q, k, v, 1.0)
    ours32 = ta.attention(q.float(), tuple(x.float() for x in k), tuple(x.float() for x in v), spec="strassen",
                          scale=1.0, backend="exact")
    assert bool(torch.isfinite(ours32).all())
    assert float((ours32.double() - theirs64).abs().max()) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [8**-0.5, 0.2])
def test_tree_exact_agrees_with_reference_poly_attention(scale, causal):
    q, k, v = _inputs(d=8, e=5, bound=2.0)
    ones = (torch.ones_like(v[0]), v[1])
    theirs, _, _ = _tree_peer(q, k, v[1], scale, causal)
    ours = ta.attention(q, k, ones, spec="tree", scale=scale, causal=causal, backend="exact")
    assert float((ours - theirs).abs().max()) < 1e-12


def test_tree_with_a_middle_value_from_the_peers_messages():
    """The peer has no value on j; its (lse23, msg) give ours for any v1 with one softmax pass."""
    q, k, v = _inputs(d=8, e=5)
    scale = 0.3
    _, lse23, msg = _tree_peer(q, k, v[1], scale)
    theirs = torch.softmax(scale * q @ k[0].transpose(-1, -2) + lse23[..., None, :], dim=-1) @ (v[0] * msg)
    ours = ta.attention(q, k, v, spec="tree", scale=scale, backend="exact")
    assert float((ours - theirs).abs().max()) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_tree_poly_within_its_bound_of_reference_poly_attention(causal):
    q, k, v = _inputs(n=32, d=4)
    ones = (torch.ones_like(v[0]), v[1])
    theirs, _, _ = _tree_peer(q, k, v[1], 0.25, causal)
    ours, info = ta.attention(q, k, ones, spec="tree", scale=0.25, causal=causal, backend="poly", return_info=True)
    assert float((ours - theirs).abs().max()) <= info.error_bound


def test_peer_inputs_are_numpy_compatible():
    """The same numbers through numpy arrays (our other input kind) give the same output."""
    q, k, v = _inputs(b=1, h=1, n=8, d=4)
    theirs = _strassen_peer(q, k, v, 0.5)
    ours = ta.attention(q.numpy(), tuple(x.numpy() for x in k), tuple(x.numpy() for x in v), spec="strassen",
                        scale=0.5, backend="exact")
    assert isinstance(ours, np.ndarray) and np.abs(ours - theirs.numpy()).max() < 1e-12
