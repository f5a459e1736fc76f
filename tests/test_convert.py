"""Drop-in use in torch models: masks through MultiheadTensorAttention, weights from
torch.nn.MultiheadAttention (from_torch), need_weights, and ta.nn.convert with its report."""

import copy

import pytest
import torch
from torch import nn

import tensorattn as ta

E, H, L, N = 16, 4, 11, 3


def _padding(lengths, total=L) -> torch.Tensor:
    """(batch, keys) bool, True on the padded tail of each sequence."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def _encoder_pair(batch_first: bool):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    ours = copy.deepcopy(theirs)
    ours.self_attn = ta.nn.MultiheadTensorAttention.from_torch(theirs.self_attn, backend="exact")
    return theirs, ours


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer_with_causal_and_padding_masks(batch_first, mode):
    """The standard calls of nn.TransformerEncoderLayer (causal src_mask with is_causal=True, a
    key padding mask, both) match nn.MultiheadAttention with the same weights; in eval mode torch's
    fused fast path is skipped for our layer, so this runs our forward."""
    theirs, ours = _encoder_pair(batch_first)
    getattr(theirs, mode)()
    getattr(ours, mode)()
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    pad = _padding([L, 8, 5])
    keep = ~pad if batch_first else ~pad.T
    calls = [dict(src_mask=causal, is_causal=True), dict(src_key_padding_mask=pad),
             dict(src_mask=causal, is_causal=True, src_key_padding_mask=pad), dict(src_mask=causal)]
    with torch.no_grad():
        for kwargs in calls:
            ref, out = theirs(x, **kwargs), ours(x, **kwargs)
            rows = keep if "src_key_padding_mask" in kwargs else torch.ones_like(keep)
            assert float((ref - out)[rows].abs().max()) <= 1e-5, kwargs


def test_multihead_masks_match_torch_in_float64():
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(E, H, batch_first=True).double()
    ours = ta.nn.MultiheadTensorAttention.from_torch(theirs, backend="exact")
    q, kv = torch.randn(N, 7, E, dtype=torch.float64), torch.randn(N, L, E, dtype=torch.float64)
    pad = _padding([L, 6, 9])
    general = torch.rand(7, L) < 0.3
    general[:, 0] = False  # every query keeps a key, so torch gives no NaN
    per_head = torch.where(torch.rand(N * H, 7, L) < 0.2, float("-inf"), torch.randn(N * H, 7, L)).double()
    per_head[..., 0] = 0.0
    for kwargs in [dict(key_padding_mask=pad), dict(attn_mask=general), dict(attn_mask=per_head),
                   dict(attn_mask=general, key_padding_mask=pad.double().masked_fill(pad, float("-inf")))]:
        ref, _ = theirs(q, kv, kv, need_weights=False, **kwargs)
        out, _ = ours(q, kv, kv, **kwargs)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_poly_with_key_padding_in_the_module_is_within_the_bound():
    torch.manual_seed(2)
    mha = ta.nn.MultiheadTensorAttention(E, H, backend="poly", tol=1e-3, qk_norm=1.0).double()
    x = torch.randn(N, L, E, dtype=torch.float64)
    pad = _padding([L, 4, 7])
    out, info = mha(x, key_padding_mask=pad, return_info=True)
    mha.backend = "exact"
    ref, _ = mha(x, key_padding_mask=pad)
    # the certificate bounds the attention output; out_proj is linear with operator inf-norm <= ||W||_inf
    gain = float(mha.out_proj.weight.abs().sum(dim=1).max())
    assert info.backend == "poly"
    assert float((out - ref).abs().max()) <= info.error_bound * gain


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(batch_first=True), dict(bias=False), dict(kdim=6, vdim=10), dict(kdim=6, vdim=10, bias=False)],
)
def test_from_torch_round_trip(kwargs):
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    ours = ta.nn.MultiheadTensorAttention.from_torch(theirs, backend="exact")
    assert ours.batch_first == theirs.batch_first and (ours.q_proj.bias is None) == (theirs.in_proj_bias is None)
    S = (N, L) if theirs.batch_first else (L, N)
    q = torch.randn(*S, E)
    k, v = torch.randn(*S, theirs.kdim), torch.randn(*S, theirs.vdim)
    ref, _ = theirs(q, k, v, need_weights=False)
    out, _ = ours(q, k, v)
    assert float((out - ref).abs().max()) <= 1e-6
    # the copy is independent of the original
    with torch.no_grad():
        ours.q_proj.weight.zero_()
    assert float(theirs.in_proj_weight.abs().max() if theirs._qkv_same_embed_dim
                 else theirs.q_proj_weight.abs().max()) > 0


def test_from_torch_for_a_higher_order_spec_and_refusals():
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    triple = ta.nn.MultiheadTensorAttention.from_torch(theirs, spec="triple", backend="exact")
    assert len(triple.k_proj) == 2
    torch.testing.assert_close(triple.k_proj[1].weight, theirs.in_proj_weight[E: 2 * E])
    assert triple(torch.randn(2, 5, E))[0].shape == (2, 5, E)
    with pytest.raises(ta.InputError, match="add_bias_kv or add_zero_attn"):
        ta.nn.MultiheadTensorAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ta.InputError, match="expects a torch.nn.MultiheadAttention"):
        ta.nn.MultiheadTensorAttention.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_returns_torchs_weights_on_exact(average):
    torch.manual_seed(4)
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    ours = ta.nn.MultiheadTensorAttention.from_torch(theirs)  # auto: need_weights runs exact
    x = torch.randn(N, L, E)
    pad = _padding([L, 9, 3])
    ref_out, ref_w = theirs(x, x, x, key_padding_mask=pad, average_attn_weights=average)
    out, w = ours(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=average)
    assert w.shape == ref_w.shape == ((N, L, L) if average else (N, H, L, L))
    assert float((w - ref_w).abs().max()) <= 1e-6 and float((out - ref_out).abs().max()) <= 1e-5
    _, w1 = ours(x[0], x[0], x[0], need_weights=True)  # unbatched
    assert w1.shape == (L, L)


def _trained_like_model():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.Linear(4, E), nn.TransformerEncoder(layer, num_layers=2), nn.Linear(E, 1))
    with torch.no_grad():  # make the second layer's scores large: past the threshold
        attn = model[1].layers[1].self_attn
        attn.in_proj_weight[: 2 * E] *= 6.0
    return model.eval()


@pytest.mark.parametrize("backend", ["auto", "poly", "exact"])
def test_convert_replaces_every_layer_and_reports_each(backend):
    model = _trained_like_model()
    x = torch.randn(4, 32, 4) * 0.2
    with torch.no_grad():
        ref = model(x)
    report = ta.nn.convert(model, x, backend=backend, tol=1e-3)
    assert [r.name for r in report] == ["1.layers.0.self_attn", "1.layers.1.self_attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    first, second = report
    assert (first.n, first.m, first.embed_dim, first.num_heads, first.dropout) == (32, 32, E, H, 0.1)
    assert first.passed and first.poly_ok and first.poly_bound > 0
    assert not second.passed and not second.poly_ok and "past the threshold" in str(report)
    assert second.backend == "exact" and 0.0 < second.error_bound < 1e-3  # exact: float32 roundoff only
    if backend == "poly":
        assert first.backend == "poly" and first.error_bound == first.poly_bound
        assert model[1].layers[0].self_attn.backend == "poly"
        assert second.reason.startswith("poly refused on the sample: B =")
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) <= (1e-5 if backend != "poly" else 1e-2)
    text = str(report)
    assert "verdict" in text and "within bound" in text and f"backend={backend!r}" in text


def test_convert_without_sample_and_with_nested_fast_path():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2).eval()  # nested-tensor fast path enabled
    x = torch.randn(N, L, E)
    pad = _padding([L, 7, 4])
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)
    report = ta.nn.convert(model, backend="exact")
    assert len(report) == 2 and report[0].verdict == "not checked (no sample)"
    with torch.no_grad():
        out = model(x, src_key_padding_mask=pad)
    assert not out.is_nested and float((out - ref)[~pad].abs().max()) <= 1e-5
    with pytest.raises(ta.InputError, match="from_torch"):
        ta.nn.convert(nn.MultiheadAttention(E, H))


def test_convert_with_a_keyword_sample_and_padding():
    """A dict sample is passed as keywords; a key padding mask keeps poly certified."""
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    x, pad = torch.randn(N, L, E) * 0.3, _padding([L, 7, 4])
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)
    report = ta.nn.convert(model, {"src": x, "src_key_padding_mask": pad}, backend="poly")
    assert report[0].poly_ok and report[0].backend == "poly"
    with torch.no_grad():
        out = model(x, src_key_padding_mask=pad)
    assert float((out - ref)[~pad].abs().max()) <= 1e-2


def test_convert_model_example_smoke(capsys):
    """examples/convert_model.py end to end with a handful of steps (a full run is in docs/torch.md)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "convert_model.py"
    spec = importlib.util.spec_from_file_location("convert_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    assert set(results) == {"torch", "exact", "auto", "poly"}
    loss0 = results["torch"][0]
    assert abs(results["exact"][0] - loss0) <= 1e-4 and len(results["poly"][2]) == 2
    assert "held-out loss" in capsys.readouterr().out


def test_convert_with_on_unbounded_ignore_runs_poly_past_the_threshold():
    """on_unbounded='ignore' lets poly run past the threshold with its (still valid) certificate."""
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 16, E) * 0.1
    with torch.no_grad():
        ref = model(x)
    report = ta.nn.convert(model, x, backend="poly", tol=1e-2, on_unbounded="ignore")
    assert not report[1].passed and report[1].poly_ok and report[1].backend == "poly"
    with torch.no_grad():
        assert float((model(x) - ref).abs().max()) <= 0.1
