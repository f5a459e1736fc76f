"""Spec language and registry."""

import pytest

import tensorattn as ta
from tensorattn.spec import parse_score, parse_value


@pytest.mark.parametrize(
    "expr, order, contracted, tokens",
    [
        ("id,jd->ij", 2, ("d",), ("i", "j")),
        ("id,jd,kd->ijk", 3, ("d",), ("i", "j", "k")),
        ("ia,jb,kab->ijk", 3, ("a", "b"), ("i", "j", "k")),
        ("id,jd,kd,ld->ijkl", 4, ("d",), ("i", "j", "k", "l")),
        (" id , jd -> ij ", 2, ("d",), ("i", "j")),
    ],
)
def test_parse_valid(expr, order, contracted, tokens):
    se = parse_score(expr)
    assert se.order == order
    assert se.contracted == contracted
    assert se.tokens == tokens


def test_spec_properties():
    s = ta.Spec("bil", "ia,jb,kab->ijk")
    assert s.order == 3
    assert s.separable
    assert s.feature_dim({"a": 3, "b": 4}) == 12
    assert s.value == "je,ke->ie"
    assert not ta.get_spec("relative").separable
    assert ta.get_spec("rope").separable
    assert "bil" in repr(s)


def test_spec_is_frozen_and_hashable():
    s = ta.Spec("x", "id,jd->ij")
    with pytest.raises(AttributeError):
        s.score = "id,jd,kd->ijk"
    assert hash(s) == hash(ta.Spec("x", "id,jd->ij"))
    assert s == ta.Spec("x", "id,jd->ij")


@pytest.mark.parametrize(
    "expr, fragment",
    [
        ("id,id->ij", "token index 'i' is shared by operands 0 and 1"),
        ("id->i", "needs a query slot and at least one key slot"),
        ("id,jd->", "empty output"),
        ("id,jd->i", "operand 1 ('jd', the key slot 1) must carry exactly one token index"),
        ("id,jd->ji", "must list every token index in operand order"),
        ("id,j$->ij", "contains the character '$'"),
        ("...id,jd->ij", "contains the character '.'"),
        ("id,jd", "has no '->'"),
        ("di,jd->ij", "must start with its token index 'i'"),
        ("ijd,jd->ij", "operand 0 ('ijd', the query) must carry exactly one token index"),
        ("i,j->ij", "contracts no feature index"),
        ("idd,jd->ij", "repeats index 'd'"),
        ("id,jd->ijd", "found 'i', 'd'"),
    ],
)
def test_parse_invalid(expr, fragment):
    with pytest.raises(ta.SpecError) as err:
        ta.Spec("bad", expr)
    assert fragment in str(err.value)
    assert expr.strip() in str(err.value) or expr in str(err.value)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("je->ie", "has 1 operand(s) but score einsum"),
        ("ke,je->ie", "must start with the token index 'j'"),
        ("je,ke->e", "must start with the query token index 'i'"),
        ("je,ke->ije", "keeps token index 'j'"),
        ("je,ke->if", "output index 'f' appears in no value operand"),
        ("jk,ke->ie", "uses token index 'k' as a value index"),
    ],
)
def test_value_einsum_invalid(value, fragment):
    with pytest.raises(ta.SpecError) as err:
        ta.Spec("bad", "id,jd,kd->ijk", value=value)
    assert fragment in str(err.value)


def test_value_einsum_valid():
    s = ta.Spec("outer", "id,jd,kd->ijk", value="je,kf->ief")
    ve = s.value_einsum
    assert ve.out_letters == "ef"
    assert ve.summed == ()
    assert parse_value("je,ke->i", parse_score("id,jd,kd->ijk")).summed == ("e",)


def test_bad_name_and_positional():
    with pytest.raises(ta.SpecError, match="identifier"):
        ta.Spec("bad name", "id,jd->ij")
    with pytest.raises(ta.SpecError, match="positional='fourier'"):
        ta.Spec("x", "id,jd->ij", positional="fourier")
    with pytest.raises(ta.SpecError, match="needs the pairwise score"):
        ta.Spec("x", "id,jd,kd->ijk", positional="rope")


def test_registry_builtins():
    assert {"pairwise", "triple", "rope", "relative"} <= set(ta.list_specs())
    assert ta.get_spec("triple").order == 3


def test_registry_register_and_duplicate(restore_registry):
    s = ta.register_spec(ta.Spec("quad", "id,jd,kd,ld->ijkl"))
    assert ta.get_spec("quad") is s
    assert "quad" in ta.list_specs()
    with pytest.raises(ta.SpecError, match="already registered"):
        ta.register_spec(ta.Spec("quad", "id,jd->ij"))
    ta.unregister_spec("quad")
    assert "quad" not in ta.list_specs()


def test_registry_unknown_lists_valid():
    with pytest.raises(ta.SpecError) as err:
        ta.get_spec("pairwize")
    msg = str(err.value)
    assert "unknown spec 'pairwize'" in msg
    for name in ("'pairwise'", "'triple'", "'rope'", "'relative'"):
        assert name in msg
    assert "ta.register_spec" in msg


def test_registered_custom_spec_runs_by_name(restore_registry):
    import numpy as np

    from tensorattn.testing import random_inputs, reference_attention

    ta.register_spec(ta.Spec("quad", "id,jd,kd,ld->ijkl"))
    q, k, v = random_inputs("quad", n=5, d=3, dtype=np.float64)
    out = ta.attention(q, k, v, spec="quad", backend="exact")
    np.testing.assert_allclose(out, reference_attention(q, k, v, spec="quad"), atol=1e-12)


def test_registry_fixture_restores_after_failure(restore_registry):
    # the fixture restores state even though this test registers and does not clean up
    ta.register_spec(ta.Spec("leaky", "id,jd->ij"))
    assert "leaky" in ta.list_specs()


def test_registry_was_restored():
    assert "leaky" not in ta.list_specs()


def test_spec_pickles():
    import pickle

    for spec in (ta.get_spec("rope"), ta.Spec("outer", "id,jd,kd->ijk", value="je,kf->ief")):
        again = pickle.loads(pickle.dumps(spec))
        assert again == spec and dict(again.options) == dict(spec.options)
