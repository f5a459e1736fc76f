"""Chunked causal poly (backends/poly_causal.py) against a per-query prefix reference built from
the same engine: every order, value einsum, block size, offset, key mask and gradient."""

from __future__ import annotations

import math

import pytest
import torch

import tensorattn as ta
from tensorattn.approx.features import augment
from tensorattn.backends import poly_causal
from tensorattn.backends.poly import FactorizedAttention, polynomial_engine
from tensorattn.backends.poly_causal import _schedule, _Term, block_cost, causal_factorized, choose_block
from tensorattn.inputs import prepare
from tensorattn.planning import plan_for
from tensorattn.request import Request

QUAD = ta.Spec("quad4", "id,jd,kd,ld->ijkl")
OUTER = ta.Spec("outer3", "id,jd,kd->ijk", value="je,kf->ief")
SUMMED = ta.Spec("summed3", "id,jd,kd->ijk", value="je,ke->i")  # a value letter summed away
MIXED = ta.Spec("mixed4", "id,jd,kd,ld->ijkl", value="je,kef,lf->if")  # shared and outer letters
SPECS = {"pairwise": ta.get_spec("pairwise"), "triple": ta.get_spec("triple"), "quad": QUAD, "outer": OUTER,
         "summed": SUMMED, "mixed": MIXED}


def prefix_reference(eng: FactorizedAttention, initial=None, key_offset: int = 0) -> torch.Tensor:
    """out_i = U_q[i] . combine(sum over visible keys of U_s[j] (x) [v_s | 1]), query by query."""
    ops, xs = eng.ops, eng.xs
    o = ops.q_offset - key_offset
    outs = []
    for i in range(xs[0].shape[1]):
        states = []
        for s in range(len(eng.values)):
            x, v = xs[1 + s], eng.values[s]
            upto = max(0, min(i + o + 1, x.shape[1]))
            U = eng.masked_features(x, eng.key_weight(s), 0, upto)
            st = (U.transpose(1, 2) @ augment(v[:, :upto])) if upto else x.new_zeros(x.shape[0], eng.rank,
                                                                                       v.shape[-1] + 1)
            states.append(st if initial is None else st + initial[s])
        res = (eng.query_features(xs[0][:, i: i + 1]) @ eng.combine(states))
        outs.append(eng.normalize(res, i, i + 1))
    return torch.cat(outs, dim=1)


def inputs(name, n, ms=None, lead=(2,), d=3, e=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    spec = SPECS[name]
    nk = spec.order - 1
    ms = ms or (n,) * nk
    shapes = {"outer": [(e,), (e + 1,)], "mixed": [(e,), (e, 2), (2,)]}.get(name, [(e,)] * nk)
    rnd = lambda *shape: torch.rand(*shape, generator=g, dtype=dtype) * 2 - 1  # noqa: E731
    q = rnd(*lead, n, d)
    ks = [rnd(*lead, m, d) for m in ms]
    vs = [rnd(*lead, m, *vsh) for m, vsh in zip(ms, shapes)]
    return (q, ks[0], vs[0]) if nk == 1 else (q, ks, vs)


def make_engine(name, q, k, v, *, kernel=True, key_padding_mask=None, **settings):
    spec = SPECS[name]
    request, options = Request.from_call(spec, backend="poly", causal=True, on_unbounded="ignore", **settings)
    ops = prepare(spec, q, k, v, request, options, key_padding_mask=key_padding_mask)
    eng = polynomial_engine(plan_for(ops, request), ops)
    if not kernel:
        eng.score_kernel = None
    return eng


def engine(name, n, ms=None, lead=(2,), kernel=True, seed=0, **settings):
    return make_engine(name, *inputs(name, n, ms, lead, seed=seed), kernel=kernel, **settings)


def close(new, ref, rtol=1e-10):
    assert new.shape == ref.shape
    assert torch.isfinite(new).all()
    err = float((new.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-300))
    assert err <= rtol, err


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n", [1, 13])
@pytest.mark.parametrize("kernel", [False, True])
def test_matches_prefix_reference(name, n, kernel):
    eng = engine(name, n, kernel=kernel)
    close(causal_factorized(eng), prefix_reference(eng))


@pytest.mark.parametrize("name", ["pairwise", "triple", "quad", "mixed"])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_any_block_size(name, block):
    eng = engine(name, 11, kernel=block != 3)  # 11: never a multiple of the block
    close(causal_factorized(eng, block=block), prefix_reference(eng))


@pytest.mark.parametrize("name", ["pairwise", "outer"])
def test_batch_dims(name):
    eng = engine(name, 9, lead=(2, 3))
    assert eng.xs[0].shape[0] == 6
    close(causal_factorized(eng, block=4), prefix_reference(eng))


@pytest.mark.parametrize("name", ["pairwise", "triple", "mixed"])
@pytest.mark.parametrize("n", [1, 5, 12])
def test_decoding_q_offset(name, n):
    m = 12
    eng = engine(name, n, ms=(m,) * (SPECS[name].order - 1), q_offset=m - n, kernel=n != 5)
    close(causal_factorized(eng, block=4), prefix_reference(eng))


def test_unequal_key_lengths():
    eng = engine("outer", 6, ms=(11, 14), q_offset=9)  # each slot has its own visible prefix
    close(causal_factorized(eng, block=4), prefix_reference(eng))


@pytest.mark.parametrize("name", ["pairwise", "triple"])
@pytest.mark.parametrize("q_offset,key_offset", [(0, -5), (0, 0), (7, 3), (0, 4), (7, 12)])
def test_initial_state_and_key_offset(name, q_offset, key_offset):
    # a sequence-parallel shard: states of 7 earlier keys, keys shifted by key_offset
    nk = SPECS[name].order - 1
    early = engine(name, 7, seed=1)
    initial = [early.key_state(s) for s in range(nk)]
    eng = engine(name, 10, q_offset=q_offset) if q_offset else engine(name, 10)
    for block in (4, None):
        close(causal_factorized(eng, initial=initial, key_offset=key_offset, block=block),
              prefix_reference(eng, initial=initial, key_offset=key_offset))


@pytest.mark.parametrize("name", ["pairwise", "triple"])
def test_small_memory_budget_many_batches(name):
    eng = engine(name, 20, memory_budget=1 << 12)
    close(causal_factorized(eng, block=4), prefix_reference(eng))


@pytest.mark.parametrize("name", ["pairwise", "triple"])
def test_key_mask(name):
    # masked keys drop out of every term; a query whose visible keys are all masked gets 0
    q, k, v = inputs(name, 9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 4] = True
    eng = make_engine(name, q, k, v, key_padding_mask=mask)
    assert eng.key_weights is not None and eng.visible is not None
    new = causal_factorized(eng, block=2)
    close(new, prefix_reference(eng))
    assert float(new[0, :3].abs().max()) == 0.0


def test_float32():
    q, k, v = inputs("triple", 30, dtype=torch.float32)
    eng = make_engine("triple", q, k, v)
    new = causal_factorized(eng)
    assert new.dtype == torch.float32
    close(new, prefix_reference(eng), rtol=1e-4)


@pytest.mark.parametrize("name", ["pairwise", "triple"])
def test_within_certificate(name):
    q, k, v = inputs(name, 33)
    out, info = ta.attention(q, k, v, spec=SPECS[name], backend="poly", causal=True, return_info=True,
                             on_unbounded="ignore")
    ex = ta.attention(q, k, v, spec=SPECS[name], backend="exact", causal=True)
    assert float((out - ex).abs().max()) <= info.error_bound


def test_choose_block():
    t2 = [_Term((0,), 1, ("e",), "e", {"e": 8})]
    b2 = choose_block(1 << 14, 495, [9], 9, t2)
    assert 8 <= b2 <= 128
    assert choose_block(3, 495, [9], 9, t2) == 3
    t3 = [_Term(T, 2, ("e", "e"), "e", {"e": 8}) for T in [(0,), (1,), (0, 1)]]
    b3 = choose_block(1 << 12, 495, [9, 9], 9, t3)
    assert b3 <= b2
    # triple: T = {0} is Hadamard-first (its X also serves T = {0, 1}); T = {1} whenever b < K
    sched = _schedule(t3, 4, 2)
    assert sched.hadamard == (True, True, False) and sched.products == {(0,), (1,)}
    assert block_cost(b3, 495, [9, 9], 9, t3) <= block_cost(2 * b3, 495, [9, 9], 9, t3)


@pytest.mark.parametrize("name", ["triple", "mixed"])
@pytest.mark.parametrize("force", [True, False])
def test_both_hadamard_modes(name, force, monkeypatch):
    def forced(terms, b, nk, kernel=False):
        modes = tuple(force and not t.shared for t in terms)
        products = set()
        for t, mode in zip(terms, modes):
            need = () if (t.shared and kernel) else (t.T if mode else t.T[:-1])
            products.update(need[:q] for q in range(1, len(need) + 1))
        return poly_causal._Schedule(modes, frozenset(products))

    monkeypatch.setattr(poly_causal, "_schedule", forced)
    eng = engine(name, 9, kernel=force)
    close(causal_factorized(eng, block=5), prefix_reference(eng))


def _grad_fn(name, n, impl, kernel=True, **settings):
    spec = SPECS[name]
    nk = spec.order - 1
    q, k, v = inputs(name, n, lead=(1,), d=2, e=2, seed=3)
    flat = [q] + (list(k) + list(v) if nk > 1 else [k, v])
    request, options = Request.from_call(spec, backend="poly", causal=True, on_unbounded="ignore", tol=1e-2,
                                         **settings)
    plan = plan_for(prepare(spec, q, k, v, request, options), request)

    def f(*ts):
        k_, v_ = (list(ts[1:1 + nk]), list(ts[1 + nk:])) if nk > 1 else (ts[1], ts[2])
        eng = polynomial_engine(plan, prepare(spec, ts[0], k_, v_, request, options))
        if not kernel:
            eng.score_kernel = None
        return impl(eng)

    return f, [t.clone().requires_grad_(True) for t in flat]


@pytest.mark.parametrize("name,n", [("pairwise", 5), ("triple", 4), ("outer", 3)])
@pytest.mark.parametrize("kernel", [False, True])
def test_gradcheck(name, n, kernel):
    f, ts = _grad_fn(name, n, lambda e: causal_factorized(e, block=2), kernel)
    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["pairwise", "triple"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_gradient_of_one_input_only(name, which):
    # in-place shortcuts must not touch tensors an autograd graph saved (only one input needs grad)
    f_new, ts_new = _grad_fn(name, 6, lambda e: causal_factorized(e, block=4))
    f_old, ts_old = _grad_fn(name, 6, prefix_reference)
    nk = SPECS[name].order - 1
    pick = {"q": [0], "k": list(range(1, 1 + nk)), "v": list(range(1 + nk, 1 + 2 * nk))}[which]
    for ts in (ts_new, ts_old):
        for i, t in enumerate(ts):
            t.requires_grad_(i in pick)
    out_new, out_old = f_new(*ts_new), f_old(*ts_old)
    close(out_new, out_old)
    dO = torch.ones_like(out_new)
    gn = torch.autograd.grad(out_new, [ts_new[i] for i in pick], dO)
    go = torch.autograd.grad(out_old, [ts_old[i] for i in pick], dO)
    for a, b in zip(gn, go):
        close(a, b, rtol=1e-9)


@pytest.mark.parametrize("backend,spec", [("favor", "pairwise"), ("taylor2", "rope"), ("poly", "rope")])
def test_every_factorized_backend(backend, spec, monkeypatch):
    # poly, FAVOR+ (per-row query stabilizer) and Taylor-2 all run the chunked form
    q, k, v = inputs("pairwise", 23, d=4)
    kw = {"spec": spec, "backend": backend, "causal": True, "on_unbounded": "ignore"}
    new = ta.attention(q, k, v, **kw)
    monkeypatch.setattr(FactorizedAttention, "causal", prefix_reference)
    close(new, ta.attention(q, k, v, **kw), rtol=1e-9)


def test_memory_stays_within_budget_order():
    # the batch of blocks comes from the budget: a tiny budget still runs one block at a time
    eng = engine("pairwise", 40, memory_budget=64)
    assert eng.budget_elems < 40
    close(causal_factorized(eng), prefix_reference(eng))
    assert math.isfinite(float(causal_factorized(eng).abs().max()))
