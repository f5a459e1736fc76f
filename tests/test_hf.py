"""Hugging Face transformers integration on a tiny, randomly initialised Llama (no download).
Skipped where transformers is not installed (it is the optional extra ``hf``)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sliding_window_causal_mask_function  # noqa: E402

import tensorattn as ta  # noqa: E402
import tensorattn.hf as tahf  # noqa: E402

LENGTH = 12


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()  # grouped-query attention: 4 query heads, 2 k/v heads


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, LENGTH))
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


def _logits(model, name, ids, mask):
    model.set_attn_implementation(name)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_names_are_registered_with_both_interfaces():
    for name in ["tensorattn", "tensorattn_exact", "tensorattn_poly"]:
        assert name in AttentionInterface() and name in AttentionMaskInterface()


def test_exact_matches_sdpa_with_left_padding():
    model = _model()
    ids, mask = _batch()
    ref = _logits(model, "sdpa", ids, mask)
    keep = mask.bool()
    for name in ["tensorattn_exact", "tensorattn"]:
        out = _logits(model, name, ids, mask)
        assert torch.isfinite(out).all()
        assert float((out - ref)[keep].abs().max()) <= 1e-4, name
    # without padding the mask function returns None and the layers run causal=True
    torch.testing.assert_close(_logits(model, "tensorattn_exact", ids, None), _logits(model, "sdpa", ids, None),
                               atol=1e-4, rtol=0)


def test_without_a_mask_function_the_padding_would_be_ignored():
    """Why the mask function is registered: an attention function alone gets no mask, and the logits
    of padded batches come out wrong without an error."""
    AttentionInterface.register("tensorattn_unmasked", tahf.attention_forward)
    try:
        model = _model()
        ids, mask = _batch()
        ref = _logits(model, "sdpa", ids, mask)
        wrong = _logits(model, "tensorattn_unmasked", ids, mask)
        assert float((wrong - ref)[mask.bool()].abs().max()) > 1e-3
    finally:
        AttentionInterface._global_mapping.pop("tensorattn_unmasked")


def test_poly_is_within_the_reported_bound_per_layer():
    """Each attention call of the poly model is within its certified bound of exact attention on the
    same inputs (the bound is per call: it certifies the attention output, not the logits)."""
    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.append((module, query, key, value, attention_mask, kwargs))
        return tahf.attention_forward(module, query, key, value, attention_mask, backend="poly", **kwargs)

    AttentionInterface.register("tensorattn_capture", capture)
    AttentionMaskInterface.register("tensorattn_capture", tahf.build_mask)
    try:
        model = _model()
        ids, mask = _batch()
        with tahf.record() as calls:
            poly = _logits(model, "tensorattn_capture", ids, mask)
        exact = _logits(model, "tensorattn_exact", ids, mask)
    finally:
        AttentionInterface._global_mapping.pop("tensorattn_capture")
        AttentionMaskInterface._global_mapping.pop("tensorattn_capture")
    assert [layer for layer, _ in calls] == [0, 1] and all(info.backend == "poly" for _, info in calls)
    for (module, q, k, v, m, kwargs), (_, info) in zip(captured, calls):
        got, _ = tahf.attention_forward(module, q, k, v, m, backend="poly", **kwargs)
        want, _ = tahf.attention_forward(module, q, k, v, m, backend="exact", **kwargs)
        assert float((got - want).abs().max()) <= info.error_bound + 1e-6
    assert torch.isfinite(poly).all() and float((poly - exact)[mask.bool()].abs().max()) <= 1e-2


def test_generation_with_a_kv_cache_matches_sdpa():
    model = _model()
    ids, mask = _batch()
    tokens = {}
    for name in ["sdpa", "tensorattn_exact"]:
        model.set_attn_implementation(name)
        with torch.no_grad():
            tokens[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                          pad_token_id=0)
    assert torch.equal(tokens["sdpa"], tokens["tensorattn_exact"])


def test_other_mask_patterns_run_on_exact_and_poly_says_so():
    """A pattern other than causal/bidirectional + padding is passed on densely: exact serves it."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    dense = tahf.build_mask(1, 8, 8, mask_function=sliding_window_causal_mask_function(3))
    assert dense.shape == (1, 1, 8, 8) and not hasattr(dense, "_tensorattn_mask")
    module = torch.nn.Module()
    out, _ = tahf.attention_forward(module, q, k, v, dense, backend="exact")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=0)
    with pytest.raises(ta.InputError, match="use backend='exact'"):
        tahf.attention_forward(module, q, k, v, dense, backend="poly")
    with pytest.raises(ta.InputError, match="attention dropout 0.1"):
        tahf.attention_forward(module, q, k, v, None, dropout=0.1)
