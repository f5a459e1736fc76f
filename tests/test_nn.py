"""torch.nn modules: TensorAttention and MultiheadTensorAttention."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import tensorattn as ta
from tensorattn.testing import reference_attention

from .strategies import QUAD


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# TensorAttention


@pytest.mark.parametrize("spec", ["pairwise", "triple", "rope"])
def test_tensor_attention_is_attention(spec):
    q = _x(2, 12, 4)
    k = q if spec != "triple" else (q, _x(2, 12, 4, seed=1))
    v = q if spec != "triple" else (q, q)
    mod = ta.nn.TensorAttention(spec=spec, backend="exact", causal=True)
    assert torch.equal(mod(q, k, v), ta.attention(q, k, v, spec=spec, backend="exact", causal=True))
    out, info = mod(q, k, v, causal=False, return_info=True)  # per-call override
    assert info.spec == spec and torch.equal(out, ta.attention(q, k, v, spec=spec, backend="exact"))
    assert list(mod.parameters()) == []


def test_tensor_attention_forwards_spec_options():
    q = _x(1, 6, 4)
    W = torch.tensor(np.broadcast_to(np.eye(4), (11, 4, 4)).copy(), dtype=torch.float32)
    mod = ta.nn.TensorAttention(spec="relative", backend="exact")
    assert torch.allclose(mod(q, q, q, rel=W), ta.attention(q, q, q, backend="exact"), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"spec": "nope"}, ta.SpecError, "unknown spec 'nope'"),
        ({"spec": 0.1}, ta.SpecError, "dropout"),
        ({"backend": "fast"}, ta.InputError, "unknown backend 'fast'"),
        ({"rope_bse": 1.0, "spec": "rope"}, ta.InputError, "unknown option 'rope_bse'"),
        ({"tol": 2.0}, ta.InputError, "tol=2.0"),
        ({"on_unbounded": "warn"}, ta.InputError, "on_unbounded='warn'"),
        ({"scale": float("nan")}, ta.InputError, "scale=nan"),
    ],
)
def test_tensor_attention_validates_at_construction(kwargs, error, words):
    with pytest.raises(error, match=words):
        ta.nn.TensorAttention(**kwargs)


# ---------------------------------------------------------------------------------------------
# MultiheadTensorAttention


def _copy_from_torch(ours: ta.nn.MultiheadTensorAttention, theirs: torch.nn.MultiheadAttention) -> None:
    E = theirs.embed_dim
    w, b = theirs.in_proj_weight, theirs.in_proj_bias
    with torch.no_grad():
        ours.q_proj.weight.copy_(w[:E])
        ours.k_proj[0].weight.copy_(w[E: 2 * E])
        ours.v_proj[0].weight.copy_(w[2 * E:])
        ours.q_proj.bias.copy_(b[:E])
        ours.k_proj[0].bias.copy_(b[E: 2 * E])
        ours.v_proj[0].bias.copy_(b[2 * E:])
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_pairwise_matches_torch_multihead_attention(batch_first, causal):
    E, H, L = 16, 4, 9
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    ours = ta.nn.MultiheadTensorAttention(E, H, batch_first=batch_first, backend="exact", causal=causal).double()
    _copy_from_torch(ours, theirs)
    shape = (3, L, E) if batch_first else (L, 3, E)
    q, k, v = (_x(*shape, seed=s, dtype=torch.float64) for s in range(3))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64) if causal else None
    ref, _ = theirs(q, k, v, need_weights=False, attn_mask=mask)
    out, weights = ours(q, k, v)
    assert weights is None
    assert torch.allclose(out, ref, atol=1e-12)
    # unbatched (L, E) input, as torch accepts it
    out1, _ = ours(q[0] if batch_first else q[:, 0])
    ref1, _ = theirs(*(q[0] if batch_first else q[:, 0],) * 3, need_weights=False, attn_mask=mask)
    assert torch.allclose(out1, ref1, atol=1e-12)


def test_triple_heads_match_reference():
    E, H, L = 12, 3, 7
    mha = ta.nn.MultiheadTensorAttention(E, H, "triple", backend="exact").double()
    x, y = _x(2, L, E, seed=1, dtype=torch.float64), _x(2, L, E, seed=2, dtype=torch.float64)
    out, _ = mha(x, (x, y), (y, x))  # one key/value tensor per slot
    heads = lambda t: t.reshape(2, L, H, E // H).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q = heads(mha.q_proj(x))
        ks = (heads(mha.k_proj[0](x)), heads(mha.k_proj[1](y)))
        vs = (heads(mha.v_proj[0](y)), heads(mha.v_proj[1](x)))
        ref = reference_attention(q, ks, vs, spec="triple")
        ref = mha.out_proj(torch.tensor(ref).transpose(1, 2).reshape(2, L, E))
    assert torch.allclose(out, ref, atol=1e-10)
    assert len(mha.k_proj) == len(mha.v_proj) == 2


def test_order4_and_kdim_vdim():
    mha = ta.nn.MultiheadTensorAttention(8, 2, QUAD, kdim=5, vdim=3, backend="exact")
    out, _ = mha(_x(2, 4, 8), _x(2, 4, 5), _x(2, 4, 3))
    assert out.shape == (2, 4, 8) and len(mha.k_proj) == 3
    assert mha.k_proj[0].in_features == 5 and mha.v_proj[2].in_features == 3


def test_causal_output_ignores_future_tokens():
    mha = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend="exact", causal=True)
    x = _x(1, 10, 8)
    y = x.clone()
    y[:, 6:] = _x(1, 4, 8, seed=5)
    a, b = mha(x)[0], mha(y)[0]
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:])
    assert not torch.allclose(mha(x, is_causal=False)[0][:, :6], a[:, :6])


def test_return_info_and_qk_norm_bound_beta():
    rho = 1.5
    mha = ta.nn.MultiheadTensorAttention(16, 2, "triple", backend="poly", qk_norm=rho, tol=1e-2,
                                         on_unbounded="ignore")
    out, info = mha(_x(2, 12, 16), return_info=True)
    assert isinstance(info, ta.AttentionInfo) and info.backend == "poly"
    assert info.beta <= mha.head_dim ** -0.5 * rho**3 * (1 + 1e-6)
    assert info.error_bound is not None and info.grad_error_bound is not None


@pytest.mark.parametrize("backend", ["exact", "poly"])
def test_training_reduces_loss(backend):
    torch.manual_seed(0)
    mha = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend=backend, qk_norm=1.0, tol=1e-2,
                                         on_unbounded="ignore")
    opt = torch.optim.Adam(mha.parameters(), lr=3e-2)
    x, target = _x(4, 6, 8, seed=1), _x(4, 6, 8, seed=2)
    losses = []
    for _ in range(15):
        loss = ((mha(x)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mha.parameters())


@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        ((10, 3), {}, ta.InputError, "not divisible by num_heads=3"),
        ((8, 0), {}, ta.InputError, "num_heads=0"),
        ((8, 2, "nope"), {}, ta.SpecError, "unknown spec 'nope'"),
        ((8, 2, 0.1), {}, ta.SpecError, "third positional argument is dropout"),
        ((8, 2, ta.Spec("bil", "ia,jb,kab->ijk")), {}, ta.SpecError, "one feature index per score operand"),
        ((8, 2, ta.Spec("sumv", "id,jd->ij", value="jef->ie")), {}, ta.SpecError, "single value index"),
        ((8, 2), {"backend": "fast"}, ta.InputError, "unknown backend 'fast'"),
        ((8, 2), {"dropout": 0.1}, ta.InputError, "dropout=0.1"),
        ((6, 2, "rope"), {}, ta.InputError, "head_dim = 6 // 2 = 3 is odd"),
        ((8, 2), {"qk_norm": -1.0}, ta.InputError, "qk_norm=-1.0"),
        ((8, 2), {"tol": 0.0}, ta.InputError, "tol=0.0"),
        ((8, 2, "triple"), {"rope_base": 2.0}, ta.InputError, "unknown option 'rope_base'"),
    ],
)
def test_multihead_validates_at_construction(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        ta.nn.MultiheadTensorAttention(*args, **kwargs)


def test_multihead_forward_errors():
    mha = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend="exact")
    x = _x(2, 5, 8)
    with pytest.raises(ta.InputError, match=r"layouts are \(L, S\) and \(batch \* num_heads, L, S\)"):
        mha(x, attn_mask=torch.zeros(5))
    with pytest.raises(ta.InputError, match=r"a 3-D mask must be \(batch \* num_heads, L, S\) = \(4, L, S\)"):
        mha(x, attn_mask=torch.zeros(3, 5, 5))
    with pytest.raises(ta.InputError, match=r"key_padding_mask has shape \(5,\); .* \(batch, keys\)"):
        mha(x, key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ta.InputError, match="key_padding_mask is a sequence of 3 masks"):
        mha(x, key_padding_mask=[torch.zeros(2, 5, dtype=torch.bool)] * 3)
    with pytest.raises(ta.InputError, match="need_weights=True: backend='poly' never forms the attention weights"):
        ta.nn.MultiheadTensorAttention(8, 2, backend="poly")(x, need_weights=True)
    with pytest.raises(ta.InputError, match="sequence of 3 tensors but spec 'triple' has 2"):
        mha(x, (x, x, x))
    with pytest.raises(ta.InputError, match=r"expected 3 dims \(batch, seq, features\)"):
        mha(x[None])


def test_repr_is_informative():
    mha = ta.nn.MultiheadTensorAttention(16, 4, "triple", backend="poly", tol=1e-2, causal=True, qk_norm=2.0)
    text = repr(mha)
    for words in ["embed_dim=16", "num_heads=4", "head_dim=4", "spec='triple'", "order=3", "backend='poly'",
                  "tol=0.01", "causal=True", "qk_norm=2", "batch_first=True", "(k_proj): ModuleList"]:
        assert words in text, words
    assert "spec='rope'" in repr(ta.nn.TensorAttention(spec="rope", rope_base=100.0))
    assert "rope_base=100.0" in repr(ta.nn.TensorAttention(spec="rope", rope_base=100.0))


def test_state_dict_round_trip():
    a = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend="exact")
    b = ta.nn.MultiheadTensorAttention(8, 2, "triple", backend="exact")
    x = _x(2, 5, 8)
    assert not torch.allclose(a(x)[0], b(x)[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(x)[0], b(x)[0])
    assert sorted(a.state_dict()) == sorted(
        [f"{p}.{w}" for p in ["q_proj", "k_proj.0", "k_proj.1", "v_proj.0", "v_proj.1", "out_proj"]
         for w in ["weight", "bias"]]
    )


@pytest.mark.parametrize("spec", ["rope", ta.Spec("mine", "id,jd,kd->ijk", options={"extra": 1})])
def test_pickles_and_deepcopies_including_custom_spec_objects(spec):
    mha = ta.nn.MultiheadTensorAttention(8, 2, spec, backend="exact", causal=True)
    x = _x(2, 5, 8)
    for clone in (pickle.loads(pickle.dumps(mha)), copy.deepcopy(mha)):
        assert clone.spec == mha.spec and repr(clone) == repr(mha)
        assert torch.equal(clone(x)[0], mha(x)[0])
    fn = ta.nn.TensorAttention(spec=spec, backend="exact")
    assert pickle.loads(pickle.dumps(fn)).spec == fn.spec


def test_torch_compile_works_with_one_graph_break():
    """The projections compile; ta.attention runs eagerly (its plan reads data), one graph break."""
    torch.manual_seed(0)
    mha = ta.nn.MultiheadTensorAttention(8, 2, "pairwise", backend="poly", tol=1e-2, qk_norm=1.0,
                                         on_unbounded="ignore")
    x = _x(2, 6, 8).requires_grad_(True)
    ref = mha(x)[0]
    compiled = torch.compile(mha, backend="eager")
    out = compiled(x)[0]
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    explanation = torch._dynamo.explain(mha)(x)
    assert explanation.graph_break_count == 1


def test_triple_task_example_smoke(tmp_path, monkeypatch):
    """examples/triple_task.py end to end with a handful of steps (the full run is in docs/torch.md)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "triple_task.py"
    spec = importlib.util.spec_from_file_location("triple_task", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "triple_task", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--out", str(tmp_path / "curves.png")])
    assert [r.name.split(",")[0] for r in results] == ["pairwise", "triple", "triple", "triple"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert results[-1].info.backend == "poly" and results[-1].exact_eval is not None
    assert all(0.0 <= r.final <= 1.0 for r in results)


def _load_example(name: str, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, name, module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_composition_example_smoke(tmp_path, monkeypatch):
    """examples/composition.py end to end with a handful of steps (the full run is in docs/poly-attention.md)."""
    module = _load_example("composition", monkeypatch)
    runs = module.main(["--quick", "--out", str(tmp_path / "curves.png")])
    assert [(r.task, r.spec) for r in runs] == [(t, s) for t in module.TASKS for s in module.MECHANISMS]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert all(0.0 <= r.final <= 1.0 and r.ms_per_step > 0 for r in runs)
    for task in module.TASKS:  # the pairwise model's wider MLP makes up for its missing projections
        params = [r.params for r in runs if r.task == task]
        assert max(params) - min(params) <= 0.01 * max(params)


def test_composition_example_data_and_hand_set_solution(monkeypatch):
    """The tasks' labels against brute force, and the hand-set tree/Strassen/triple weights solve compose."""
    module = _load_example("composition", monkeypatch)
    args = module.parse([])
    tokens, target = module.make_compose(16, args.m, args.queries, np.random.default_rng(0))
    for seq, ys in zip(tokens.tolist(), target.tolist()):
        f = {x: y for kind, x, y in seq if kind == module.KIND_F}
        g = {y: z for kind, y, z in seq if kind == module.KIND_G}
        queries = [x for kind, x, _ in seq if kind == module.KIND_QUERY]
        assert sorted(queries) == list(range(args.m)) and sorted(g.values()) == list(range(2 * args.m, 3 * args.m))
        assert ys == [g[f[x]] - 2 * args.m for x in queries]
    p, labels = module.make_match3(16, 5, 7, np.random.default_rng(0))
    for seq, lab in zip(p.tolist(), labels.tolist()):
        assert lab == [float(any((a + b + c) % 7 == 0 for b in seq for c in seq)) for a in seq]
    test = module.make_compose(64, args.m, args.queries, np.random.default_rng(1))
    for spec in ("tree", "strassen", "triple"):
        model = module.hand_set(module.OneLayer("compose", spec, args, args.hidden), args.m)
        assert module.evaluate(model, test)[0] == 1.0
    with pytest.raises(ValueError, match="no hand-set solution"):
        module.hand_set(module.OneLayer("compose", "pairwise", args, args.hidden), args.m)
