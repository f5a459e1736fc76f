"""ta.distributed.attention on real process groups: gloo on CPU, spawned worlds of 2 and 3 ranks.

Each spawned world runs many checks, so process start-up is paid once per world. Every rank builds
the same full inputs from a seed, takes its shard of positions, and compares its output shard, and
the gradients of its shards, with single-process ta.attention on the full inputs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.backends.exact import TileEngine, stream_forward
from tensorattn.distributed import _merge
from tensorattn.inputs import prepare
from tensorattn.testing import random_inputs, random_rel, reference_attention

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# --------------------------------------------------------------------------- spawning


def _entry(rank: int, world: int, init_file: str, worker, args) -> None:
    torch.set_num_threads(1)  # ranks share the cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),  # a desynchronized test fails instead of hanging
    )
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, worker, *args) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks; a failure on any rank fails."""
    mp.spawn(_entry, args=(world, str(tmp_path / f"rendezvous-{world}"), worker, args), nprocs=world,
             join=True)


# --------------------------------------------------------------------------- helpers


def _bounds(total: int, world: int) -> list[int]:
    """Unequal contiguous shards (as np.array_split): boundaries of each rank's positions."""
    return [0, *np.cumsum([len(a) for a in np.array_split(np.arange(total), world)]).tolist()]


def _shard(x, rank: int, cuts: list[int]):
    if isinstance(x, tuple):
        return tuple(_shard(t, rank, cuts) for t in x)
    return x[..., cuts[rank]: cuts[rank + 1], :]


CASES = [  # (spec, backend, causal, n, options)
    ("pairwise", "exact", False, 11, {}),
    ("pairwise", "exact", True, 11, {}),
    ("pairwise", "poly", False, 11, {}),
    ("pairwise", "poly", True, 11, {}),
    ("rope", "exact", False, 10, {}),
    ("rope", "exact", True, 10, {"rope_layout": "half"}),
    ("rope", "poly", False, 10, {}),
    ("rope", "poly", True, 10, {}),
    ("triple", "exact", False, 7, {}),
    ("triple", "exact", True, 7, {}),
    ("triple", "poly", False, 7, {}),
    ("triple", "poly", True, 7, {}),
    ("strassen", "exact", False, 7, {}),
    ("tree", "exact", True, 7, {}),
]


def _matches_single_process(rank: int, world: int) -> None:
    for case, (spec, backend, causal, n, opts) in enumerate(CASES):
        q, k, v = random_inputs(spec, n=n, d=4, batch=(2,), dtype=np.float64, seed=case)
        kw = dict(spec=spec, backend=backend, causal=causal, scale=1 / 4, **opts)
        full, info1 = ta.attention(q, k, v, return_info=True, **kw)
        cuts = _bounds(n, world)
        out, info = ta.distributed.attention(
            _shard(q, rank, cuts), _shard(k, rank, cuts), _shard(v, rank, cuts), return_info=True, **kw
        )
        want = full[..., cuts[rank]: cuts[rank + 1], :]
        where = f"rank {rank}/{world}, case {case} {spec} {backend} causal={causal}"
        assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == want.shape, where
        # same global plan on every rank as on one process: same degree, same certificate
        assert (info.backend, info.degree, info.rank) == (info1.backend, info1.degree, info1.rank), where
        assert info.beta == pytest.approx(info1.beta) and info.error_bound == pytest.approx(info1.error_bound)
        err = float(np.abs(out - want).max())
        assert err <= 1e-10, f"{where}: max |distributed - single process| = {err:.3e}"
        if backend == "poly":
            exact = ta.attention(q, k, v, **{**kw, "backend": "exact"})[..., cuts[rank]: cuts[rank + 1], :]
            eps = float(np.abs(out - exact).max())
            assert eps <= info.error_bound, f"{where}: error {eps:.3e} > certified {info.error_bound:.3e}"


def _cross_attention_and_custom_spec(rank: int, world: int) -> None:
    """Non-causal cross-attention (m != n, separate shard lengths) and a custom spec whose second
    key slot carries a matrix per token."""
    rng = np.random.default_rng(3)
    q, k, v = rng.uniform(-1, 1, (9, 4)), rng.uniform(-1, 1, (6, 4)), rng.uniform(-1, 1, (6, 3))
    bilinear = ta.Spec("bilinear3", "ia,jb,kab->ijk")
    qa, kb, kab = rng.uniform(-1, 1, (7, 3)), rng.uniform(-1, 1, (5, 3)), rng.uniform(-1, 1, (5, 3, 3))
    va, vb = rng.uniform(-1, 1, (5, 2)), rng.uniform(-1, 1, (5, 2))
    for backend in ("exact", "poly"):
        qc, kc = _bounds(9, world), _bounds(6, world)
        out = ta.distributed.attention(_shard(q, rank, qc), _shard(k, rank, kc), _shard(v, rank, kc),
                                       backend=backend)
        want = ta.attention(q, k, v, backend=backend)[qc[rank]: qc[rank + 1]]
        assert np.abs(out - want).max() <= 1e-10, (rank, backend)
        qc, kc = _bounds(7, world), _bounds(5, world)
        out = ta.distributed.attention(
            qa[qc[rank]: qc[rank + 1]], (kb[kc[rank]: kc[rank + 1]], kab[kc[rank]: kc[rank + 1]]),
            (va[kc[rank]: kc[rank + 1]], vb[kc[rank]: kc[rank + 1]]), spec=bilinear, backend=backend,
            on_unbounded="ignore")  # tiny n is past the threshold; the certificate still holds
        want = ta.attention(qa, (kb, kab), (va, vb), spec=bilinear, backend=backend,
                            on_unbounded="ignore")[qc[rank]: qc[rank + 1]]
        assert np.abs(out - want).max() <= 1e-10, (rank, backend, "bilinear3")




def _torch_float32_and_bytes(rank: int, world: int) -> None:
    """torch float32 in, torch float32 out; measured traffic equals communication_bytes()."""
    n, d, e = 36, 8, 8
    q, k, v = (torch.from_numpy(a) for a in random_inputs("pairwise", n=n, d=d, batch=(3,), seed=7))
    cuts = _bounds(n, world)
    sl = slice(cuts[rank], cuts[rank + 1])
    for backend in ("exact", "poly"):
        for causal in (False, True):
            full, info = ta.attention(q, k, v, backend=backend, causal=causal, scale=1 / d, return_info=True)
            with ta.distributed.count_bytes() as log:
                out = ta.distributed.attention(q[:, sl], k[:, sl], v[:, sl], backend=backend, causal=causal,
                                               scale=1 / d)
            assert out.dtype == torch.float32 and out.shape == (3, sl.stop - sl.start, e)
            err = float((out - full[:, sl]).abs().max())
            assert err <= 2e-6, f"rank {rank} {backend} causal={causal}: {err:.3e}"
            if backend == "poly":
                itemsize = 8 if info.feature_dtype == "float64" else 4
                want = ta.distributed.communication_bytes(
                    "poly", n=n, ranks=world, d=d, e=e, rank=info.rank, batch=3, causal=causal,
                    itemsize=itemsize)
                got = log.received_by_op["poly_prefix" if causal else "poly_states"]
                assert got == want, f"rank {rank} poly causal={causal}: {got} != {want}"
            else:
                got = log.received_by_op.get("ring", 0)
                # non-causal: every rank gets P-1 blocks; causal pipeline: rank r gets its r predecessors
                blocks = (world - 1) if not causal else rank
                assert got == sum(3 * (cuts[s + 1] - cuts[s]) * (d + e) * 4 for s in range(world)
                                  if s != rank and (not causal or s < rank)), (rank, causal, got)
                if rank == world - 1 and n % world == 0:
                    want = ta.distributed.communication_bytes("exact", n=n, ranks=world, d=d, e=e, batch=3)
                    assert got == want and blocks == world - 1


def _raises_everywhere(call, *fragments: str) -> None:
    with pytest.raises(ta.InputError) as err:
        call()
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def _bad_shards(rank: int, world: int) -> None:
    """Every rank raises a clear InputError, whichever rank holds the bad shard (no hang)."""
    rng = np.random.default_rng(rank)
    draw = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)  # noqa: E731
    d = 4 if rank == 1 else 8
    _raises_everywhere(lambda: ta.distributed.attention(draw(2, 5, d), draw(2, 5, d), draw(2, 5, 8)),
                       "'d' differs across ranks", "rank 0: d=8", "rank 1: d=4", "Fix")
    batch = 3 if rank == 1 else 2
    _raises_everywhere(lambda: ta.distributed.attention(draw(batch, 5, 8), draw(batch, 5, 8), draw(batch, 5, 8)),
                       "leading (batch/head) dims differ", "rank 0: (2,)", "rank 1: (3,)")
    q = draw(2, 5, 8)
    if rank == 1:
        q[1, 3, 2] = np.nan
    # the bad rank raises its own precise error, the others say which rank failed and why
    _raises_everywhere(lambda: ta.distributed.attention(q, draw(2, 5, 8), draw(2, 5, 8)),
                       "non-finite", "(1, 3, 2)", *(["failed on rank 1"] if rank != 1 else []))
    m = 4 if rank == 0 else 5
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(m, 8), draw(m, 8), causal=True),
                       "same positions of q and k", "rank 0: (4,)")
    backend = "poly" if rank == 1 else "exact"
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), backend=backend),
                       "ranks disagree on backend", "'exact'", "'poly'")
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), backend="favor"),
                       "no sequence-parallel implementation")
    # a mask on one rank only: that rank's error reaches the others through the handshake
    mask = np.zeros(5, dtype=bool) if rank == 1 else None
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), key_padding_mask=mask),
                       "key_padding_mask cannot be passed", *(["failed on rank 1"] if rank != 1 else ["Fix"]))
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), q_offset=3),
                       "q_offset=3")
    W = np.random.default_rng(99).uniform(-1, 1, (19, 8, 8)).astype(np.float32)  # the same on every rank
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), spec="relative", rel=W,
                                                        backend="poly"),
                       "'relative' has no sequence-parallel", "backend='exact'", "ta.attention(", "spec='rope'")
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), spec="relative",
                                                        rel=W[:12]), "rel (W) has 12 matrices", "n+m-1 = 10+10-1 = 19")
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), draw(5, 8), draw(5, 8), spec="relative",
                                                        rel=draw(19, 8, 8)), "rel (W) differs across ranks")
    x3 = (draw(5, 8), draw(5, 8))
    _raises_everywhere(lambda: ta.distributed.attention(draw(5, 8), x3, x3, spec="strassen", backend="poly"),
                       "attention polynomial 'strassen' has no sequence-parallel", "backend='exact'")
    qg = torch.zeros(5, 8, requires_grad=rank == 0)
    _raises_everywhere(lambda: ta.distributed.attention(qg, torch.zeros(5, 8), torch.zeros(5, 8)),
                       "require grad differ across ranks", "rank 0: q", "rank 1: none", "torch.no_grad()")
    # after all those refusals the ranks are still in step: a good call works
    q, k, v = random_inputs("pairwise", n=10, d=8, seed=1)
    cuts = _bounds(10, world)
    out = ta.distributed.attention(_shard(q, rank, cuts), _shard(k, rank, cuts), _shard(v, rank, cuts),
                                   backend="exact")
    want = ta.attention(q, k, v, backend="exact")[cuts[rank]: cuts[rank + 1]]
    assert np.abs(out - want).max() <= 1e-6


GRAD_CASES = [  # (spec, backend, causal, n, options); memory_budget=600 sends the ring in 1-token pieces
    ("pairwise", "exact", False, 11, {}),
    ("pairwise", "exact", True, 11, {"memory_budget": 600}),
    ("pairwise", "poly", False, 11, {}),
    ("pairwise", "poly", True, 11, {}),
    ("rope", "exact", False, 10, {"rope_layout": "half"}),
    ("rope", "exact", True, 10, {}),
    ("rope", "poly", False, 10, {}),
    ("rope", "poly", True, 10, {}),
    ("triple", "exact", False, 7, {"memory_budget": 600}),
    ("triple", "exact", True, 7, {}),
    ("triple", "poly", False, 7, {}),
    ("triple", "poly", True, 7, {}),
    ("tree", "exact", False, 6, {}),
]


def _leaves(x, requires_grad: bool = True):
    if isinstance(x, tuple):
        return tuple(_leaves(t, requires_grad) for t in x)
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=requires_grad)


def _flat(x) -> list:
    return list(x) if isinstance(x, tuple) else [x]


def _shard_leaves(x, rank: int, cuts: list[int]):
    """This rank's positions of a full leaf, as a new leaf with the same requires_grad."""
    if isinstance(x, tuple):
        return tuple(_shard_leaves(t, rank, cuts) for t in x)
    return x.detach()[..., cuts[rank]: cuts[rank + 1], :].clone().requires_grad_(x.requires_grad)


def _max_grad_difference(shards: list, fulls: list, rank: int, cuts: list[int]) -> float:
    worst = 0.0
    for part, whole in zip(shards, fulls):
        assert (part.grad is None) == (whole.grad is None)
        if part.grad is not None:
            worst = max(worst, float((part.grad - whole.grad[..., cuts[rank]: cuts[rank + 1], :]).abs().max()))
    return worst


def _gradients_match_single_process(rank: int, world: int) -> None:
    """Backward through ta.distributed.attention gives each rank the gradient of its shards that
    one process gets on the concatenated inputs, and the same gradient certificate."""
    for case, (spec, backend, causal, n, opts) in enumerate(GRAD_CASES):
        q, k, v = random_inputs(spec, n=n, d=4, batch=(2,), dtype=np.float64, seed=case)
        kw = dict(spec=spec, backend=backend, causal=causal, scale=1 / 4, **opts)
        # case 0: only q tracks grad (the ring's dK/dV stay home); case 2: only k and v do
        Q, K, V = _leaves(q, case != 2), _leaves(k, case != 0), _leaves(v, case != 0)
        full, info1 = ta.attention(Q, K, V, return_info=True, **kw)
        upstream = torch.from_numpy(np.random.default_rng(50 + case).standard_normal(tuple(full.shape)))
        (full * upstream).sum().backward()
        cuts = _bounds(n, world)
        qs, ks, vs = (_shard_leaves(t, rank, cuts) for t in (Q, K, V))
        out, info = ta.distributed.attention(qs, ks, vs, return_info=True, **kw)
        (out * upstream[..., cuts[rank]: cuts[rank + 1], :]).sum().backward()
        where = f"rank {rank}/{world}, case {case} {spec} {backend} causal={causal} {opts}"
        assert float((out - full[..., cuts[rank]: cuts[rank + 1], :]).abs().max()) <= 1e-10, where
        err = _max_grad_difference([qs, *_flat(ks), *_flat(vs)], [Q, *_flat(K), *_flat(V)], rank, cuts)
        assert err <= 1e-10, f"{where}: max |grad distributed - grad single process| = {err:.3e}"
        assert (info.backend, info.degree) == (info1.backend, info1.degree), where
        assert info.grad.names == info1.grad.names, where
        assert info.grad.per_l1 == pytest.approx(info1.grad.per_l1, rel=1e-12), where
        assert info.grad_error_bound == pytest.approx(info1.grad_error_bound, rel=1e-12), where


def _relative_gradients(rank: int, world: int) -> None:
    """Spec relative on the exact ring: W is indexed with global positions; each rank's dW is its
    part, and the parts sum to the one-process dW."""
    n, d = 9, 4
    for case, (causal, opts) in enumerate([(False, {}), (True, {"alibi_slope": 0.1, "memory_budget": 700})]):
        q, k, v = random_inputs("pairwise", n=n, d=d, batch=(2,), dtype=np.float64, seed=case)
        W = random_rel(n, n, d, dtype=np.float64, seed=case)
        Q, K, V, Wt = (_leaves(a) for a in (q, k, v, W))
        kw = dict(spec="relative", causal=causal, scale=1 / d, **opts)
        full = ta.attention(Q, K, V, rel=Wt, backend="exact", **kw)
        upstream = torch.from_numpy(np.random.default_rng(case).standard_normal(tuple(full.shape)))
        (full * upstream).sum().backward()
        cuts = _bounds(n, world)
        qs, ks, vs = (_shard_leaves(t, rank, cuts) for t in (Q, K, V))
        Ws = Wt.detach().clone().requires_grad_(True)
        out, info = ta.distributed.attention(qs, ks, vs, rel=Ws, return_info=True, **kw)  # 'auto' runs exact
        assert info.backend == "exact"
        (out * upstream[:, cuts[rank]: cuts[rank + 1]]).sum().backward()
        assert float((out - full[:, cuts[rank]: cuts[rank + 1]]).abs().max()) <= 1e-10
        assert _max_grad_difference([qs, ks, vs], [Q, K, V], rank, cuts) <= 1e-10, (rank, case)
        dW = Ws.grad.clone()
        dist.all_reduce(dW)
        assert float((dW - Wt.grad).abs().max()) <= 1e-10, (rank, case)


def _backward_bytes(rank: int, world: int) -> None:
    """The backward's traffic: poly moves r x (e+1) per slot whatever n is; the exact ring passes
    the blocks again and their dK/dV accumulators P times. Both match communication_bytes()."""
    d = e = 4
    for causal in (False, True):
        got = []
        for n in (12, 48):
            q, k, v = (_shard_leaves(t, rank, _bounds(n, world))
                       for t in (_leaves(a) for a in random_inputs("pairwise", n=n, d=d, dtype=np.float64, seed=n)))
            out, info = ta.distributed.attention(q, k, v, backend="poly", degree=2, causal=causal, scale=1 / d,
                                                 return_info=True)
            with ta.distributed.count_bytes() as log:
                out.sum().backward()
            op = "poly_prefix_grad" if causal else "poly_states_grad"
            assert set(log.calls) == {op, "gradient_check"}, log.calls
            assert log.received_by_op["gradient_check"] == world * 8  # one float64 flag per rank
            payload = log.received - log.received_by_op["gradient_check"]
            got.append(payload)
            assert payload == ta.distributed.communication_bytes(
                "poly", n=n, ranks=world, d=d, e=e, rank=info.rank, causal=causal, itemsize=8, backward=True)
        assert got[0] == got[1], f"poly backward bytes depend on n: {got}"
    n = 4 * world
    q, k, v = (_shard_leaves(t, rank, _bounds(n, world))
               for t in (_leaves(a) for a in random_inputs("pairwise", n=n, d=d, dtype=np.float64, seed=0)))
    out = ta.distributed.attention(q, k, v, backend="exact", scale=1 / d)
    with ta.distributed.count_bytes() as log:
        out.sum().backward()
    assert log.received_by_op["ring_backward"] == (world - 1) * 4 * (d + e) * 8
    assert log.received_by_op["ring_grads"] == world * 4 * (d + e) * 8
    assert log.received - log.received_by_op["gradient_check"] == ta.distributed.communication_bytes(
        "exact", n=n, ranks=world, d=d, e=e, itemsize=8, backward=True)


def _training_example(rank: int, world: int) -> None:
    """examples/distributed_training.py: a few steps on 2 ranks follow the one-process loss curve."""
    path = Path(__file__).resolve().parents[1] / "examples" / "distributed_training.py"
    spec = importlib.util.spec_from_file_location("distributed_training", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    kw = dict(steps=3, n=24, batch=2)
    sharded = example.train(rank=rank, world=world, distributed=True, **kw)
    assert example.compare(sharded, example.train(**kw)) <= 1e-4, sharded


def _values_far_from_one(rank: int, world: int) -> None:
    """Subnormal and huge float32 values: each rank runs on values near 1 and scales back, as one
    process does (the same global powers of two), so the result is the single-process one and within
    the certificate, which allows half a subnormal for that rounding (two before, on raw values)."""
    n, d = 12, 4
    cuts = _bounds(n, world)
    sl = slice(cuts[rank], cuts[rank + 1])
    gen = np.random.default_rng(3)
    for vmag in (1e-44, 1e-41, 1e37):
        q, k = (gen.uniform(-1, 1, (1, n, d)).astype(np.float32) for _ in range(2))
        v = (gen.uniform(-1, 1, (1, n, d)) * vmag).astype(np.float32)
        ref = reference_attention(*(a.astype(np.float64) for a in (q, k, v)), scale=0.5)[:, sl]
        for backend in ("exact", "poly"):
            out, info = ta.distributed.attention(q[:, sl], k[:, sl], v[:, sl], backend=backend, scale=0.5,
                                                 return_info=True)
            single = ta.attention(q, k, v, backend=backend, scale=0.5)[:, sl]
            where = f"rank {rank} {backend} values ~{vmag:g}"
            assert float(np.abs(out.astype(np.float64) - single).max()) <= info.error_bound, where
            err = float(np.abs(out.astype(np.float64) - ref).max())
            assert err <= info.error_bound, f"{where}: error {err:.3e} > certified {info.error_bound:.3e}"


def _scaled(x, mag: float, dtype: torch.dtype):
    """``x * mag`` as a torch tensor of ``dtype`` (each array of a sequence)."""
    if isinstance(x, (list, tuple)):
        return tuple(_scaled(a, mag, dtype) for a in x)
    return torch.from_numpy(x * mag).to(dtype)


def _certificate_sweep(rank: int, world: int, cases: int = 40) -> None:
    """Seeded random calls (spec, backend, causal, dtype, magnitudes of q, k and v from subnormal to
    near the dtype's limit, scale, tol): every result is finite and within its certified error
    bound, or the call raises a TensorAttnError, on every rank alike."""
    gen = np.random.default_rng(123)
    checked = 0
    for case in range(cases):
        spec = ("pairwise", "rope", "triple", "strassen", "tree")[gen.integers(5)]
        backend = ("exact", "poly", "auto")[gen.integers(3)]
        causal = bool(gen.integers(2))
        dtype = ("float16", "bfloat16", "float32", "float64")[gen.integers(4)]
        n, d = int(gen.integers(world, 9)), int(gen.choice([2, 4]))
        qmag = 10 ** gen.uniform(-3, 1)
        vmag = 10 ** (gen.uniform(-6, 4) if dtype == "float16" else
                      gen.choice([gen.uniform(-42, -30), gen.uniform(-3, 3), gen.uniform(30, 37)]))
        scale = float(gen.choice([0.25, 1.0, 10 ** gen.uniform(-3, 1)]))
        tol = float(gen.choice([1e-1, 1e-2, 1e-3]))
        q, k, v = random_inputs(spec, n=n, d=d, batch=(1,), dtype=np.float64, seed=case)

        tdtype = getattr(torch, dtype)
        Q, K, V = _scaled(q, qmag, tdtype), _scaled(k, qmag, tdtype), _scaled(v, vmag, tdtype)
        cuts = _bounds(n, world)
        kw = dict(spec=spec, backend=backend, causal=causal, scale=scale, tol=tol, on_unbounded="ignore")
        where = f"rank {rank} case {case}: {spec} {backend} causal={causal} {dtype} |q| {qmag:.3g} |v| {vmag:.3g}"
        try:
            out, info = ta.distributed.attention(_shard(Q, rank, cuts), _shard(K, rank, cuts), _shard(V, rank, cuts),
                                                 return_info=True, **kw)
        except ta.TensorAttnError:
            continue
        wide = lambda x: tuple(t.double().numpy() for t in x) if isinstance(x, tuple) else x.double().numpy()  # noqa: E731
        ref = reference_attention(wide(Q), wide(K), wide(V), spec=spec, scale=scale, causal=causal)
        got = out.double().numpy()
        assert np.isfinite(got).all(), where
        err = float(np.abs(got - ref[..., cuts[rank]: cuts[rank + 1], :]).max())
        assert err <= info.error_bound, f"{where}: error {err:.3e} > certified {info.error_bound:.3e}"
        checked += 1
    assert checked >= cases // 2, checked


def _gradient_overflow_raises_everywhere(rank: int, world: int) -> None:
    """Values near float32's largest number: the output is finite, the gradients are not. As on one
    process, backward() raises an InputError, on every rank (a rank raising alone would hang the
    others in the next collective), and the check's traffic is one float64 flag per rank."""
    gen = torch.Generator().manual_seed(0)
    n = 2 * world
    q, k = torch.randn(1, n, 2, generator=gen) * 3, torch.randn(1, n, 2, generator=gen) * 3
    v = torch.rand(1, n, 2, generator=gen) * 1e37
    sl = slice(*_bounds(n, world)[rank: rank + 2])
    qs, ks = q[:, sl].clone().requires_grad_(), k[:, sl].clone().requires_grad_()
    out = ta.distributed.attention(qs, ks, v[:, sl], backend="exact", scale=1.0)
    assert bool(torch.isfinite(out).all())
    _raises_everywhere(lambda: (out * 100).sum().backward(), "overflowed torch.float32's largest finite number",
                       "Fix: rescale")


def _two_rank_checks(rank: int, world: int) -> None:
    _matches_single_process(rank, world)
    _gradients_match_single_process(rank, world)
    _cross_attention_and_custom_spec(rank, world)
    _bad_shards(rank, world)
    _training_example(rank, world)
    _values_far_from_one(rank, world)
    _certificate_sweep(rank, world)
    _gradient_overflow_raises_everywhere(rank, world)


# --------------------------------------------------------------------------- tests


def test_uninitialized_process_group_is_refused():
    assert not dist.is_initialized()  # importing tensorattn initializes nothing
    q = np.zeros((4, 8), np.float32)
    _raises_everywhere(lambda: ta.distributed.attention(q, q, q), "is_initialized() is False",
                       "init_process_group", "torchrun")


@given(n=st.integers(1, 6), cuts=st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True),
       causal=st.booleans(), seed=st.integers(0, 3))
def test_log_sum_exp_merge_of_key_blocks_is_one_softmax(n, cuts, causal, seed):
    """The exact ring's merge: blocks of keys at global offsets, merged, equal one softmax. Causal
    blocks leave rows with no visible key (lse = -inf), which must get weight 0."""
    m = 6 if not causal else n
    bounds = sorted({0, m, *[c for c in cuts if c < m]})
    q, k, v = random_inputs("pairwise", n=n, m=m, d=4, dtype=np.float64, seed=seed)
    spec = ta.get_spec("pairwise")
    request = ta.Request(causal=causal)
    ops = prepare(spec, q, k, v, request)
    acc = None
    for a, b in zip(bounds, bounds[1:]):
        block = replace(ops, keys=(ops.keys[0][:, a:b],), values=(ops.values[0][:, a:b],), ms=(b - a,),
                        k_offsets=(a,))
        engine = TileEngine(block, request.memory_budget)
        acc = _merge(acc, *stream_forward(engine, ops.q, list(block.keys), list(block.values), None))
    want = reference_attention(q, k, v, causal=causal)
    assert np.abs(acc[0].numpy() - want).max() <= 1e-12


def test_communication_formula():
    poly = ta.distributed.communication_bytes("poly", n=1 << 16, ranks=4, d=8, e=8, rank=1287)
    assert poly == ta.distributed.communication_bytes("poly", n=1 << 20, ranks=4, d=8, e=8, rank=1287)
    assert poly == 1287 * 9 * 4
    assert ta.distributed.communication_bytes("exact", n=1 << 16, ranks=4, d=8, e=8) == 3 * (1 << 14) * 16 * 4
    assert ta.distributed.communication_bytes("exact", n=64, ranks=4, d=8, e=8, order=3) == 15 * 16 * 16 * 4
    # backward: poly moves the gradients of the same statistics; the ring adds P accumulator hops
    assert poly == ta.distributed.communication_bytes("poly", n=1 << 16, ranks=4, d=8, e=8, rank=1287, backward=True)
    block = (1 << 14) * 16 * 4
    assert ta.distributed.communication_bytes("exact", n=1 << 16, ranks=4, d=8, e=8, backward=True) == (3 + 4) * block
    assert ta.distributed.communication_bytes("exact", n=64, ranks=4, d=8, e=8, order=3, backward=True) == (
        (15 + 4 + 16) * 16 * 16 * 4)
    assert ta.distributed.communication_bytes("exact", n=64, ranks=1, d=8, e=8, backward=True) == 0
    with pytest.raises(ta.InputError, match="rank="):
        ta.distributed.communication_bytes("poly", n=64, ranks=4, d=8, e=8)


def test_two_ranks_match_single_process_with_gradients_and_refuse_bad_shards(tmp_path):
    _spawn(tmp_path, 2, _two_rank_checks)


def _subgroups(rank: int, world: int) -> None:
    """Groups [0, 2] and [1] run independent calls, forward and backward; group rank 1 of [0, 2]
    is global rank 2."""
    members = [[0, 2], [1]]
    groups = [dist.new_group(ranks) for ranks in members]
    which = 1 if rank == 1 else 0
    group, sub_rank, size = groups[which], members[which].index(rank), len(members[which])
    q, k, v = random_inputs("pairwise", n=9, d=4, dtype=np.float64, seed=which)
    Q, K, V = _leaves(q), _leaves(k), _leaves(v)
    cuts = _bounds(9, size)
    for backend in ("exact", "poly"):
        for causal in (False, True):
            kw = dict(backend=backend, causal=causal, on_unbounded="ignore")
            qs, ks, vs = (_shard_leaves(t, sub_rank, cuts) for t in (Q, K, V))
            out = ta.distributed.attention(qs, ks, vs, group=group, **kw)
            for t in (Q, K, V):
                t.grad = None
            want = ta.attention(Q, K, V, **kw)
            assert float((out - want[cuts[sub_rank]: cuts[sub_rank + 1]]).abs().max()) <= 1e-10, (rank, backend)
            out.sum().backward()
            want.sum().backward()
            assert _max_grad_difference([qs, ks, vs], [Q, K, V], sub_rank, cuts) <= 1e-10, (rank, backend)


def _three_rank_checks(rank: int, world: int) -> None:
    _matches_single_process(rank, world)
    _gradients_match_single_process(rank, world)
    _relative_gradients(rank, world)
    _torch_float32_and_bytes(rank, world)
    _backward_bytes(rank, world)
    _subgroups(rank, world)


def test_three_ranks_match_single_process_with_gradients_and_count_bytes(tmp_path):
    _spawn(tmp_path, 3, _three_rank_checks)
