"""Fuzzing the public API: ``attention``, ``plan``, ``check_bounds``, the nn modules and the CLI.

Drawn shapes (0 and 1 included), every numpy and torch dtype, NaN/Inf, huge and tiny values,
wrong types for every keyword and every built-in spec. The properties:

P1  the only exceptions are ``ta.TensorAttnError`` subclasses (and KeyboardInterrupt);
P2  for finite input the output is finite (gradients too);
P3  for every dtype, max|out - exact| <= info.error_bound, exact computed in float64 on the
    inputs as given (the float64 numpy reference of ``tensorattn.testing``); for poly, every
    gradient within ``grad_bound_for`` of float64 exact gradients;
P4  numpy in -> numpy out, torch in -> torch out, the dtype of q, the leading dims of q.

The ``ci`` profile (the default) runs a few dozen derandomized examples per test; run
``pytest tests/test_fuzz.py --hypothesis-profile=deep`` for 10,000 per test. With
``TENSORATTN_FUZZ_STATS=path.json`` the run writes its counts there: examples per test, errors by
type, NaN outputs for finite input, and per dtype the certificates checked, violated and the worst
measured / bound ratio (gradient certificates under "<dtype> gradients").
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.cli import main as cli_main
from tensorattn.testing import reference_attention

# ----------------------------------------------------------------------------------------- counts

STATS: dict[str, Any] = {
    "examples": Counter(), "errors": Counter(), "nan_for_finite_input": 0,
    "certificates": defaultdict(lambda: {"checked": 0, "violations": 0, "worst_ratio": 0.0, "worst_case": ""}),
}


@pytest.fixture(autouse=True)
def _write_stats():
    """After every test (so a run stopped early still leaves the counts so far)."""
    yield
    path = os.environ.get("TENSORATTN_FUZZ_STATS")
    if path:
        data = {"examples": dict(STATS["examples"]), "errors": dict(STATS["errors"]),
                "nan_for_finite_input": STATS["nan_for_finite_input"],
                "certificates": {k: dict(v) for k, v in STATS["certificates"].items()}}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)


def count(test: str) -> None:
    STATS["examples"][test] += 1


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def call(fn, *args, **kwargs):
    """("ok", result) or ("error", TensorAttnError). Any other exception fails P1 (it propagates)."""
    try:
        with quiet():
            result = fn(*args, **kwargs)
    except ta.TensorAttnError as exc:
        STATS["errors"][type(exc).__name__] += 1
        return "error", exc
    except KeyboardInterrupt:  # pragma: no cover
        raise
    except BaseException as exc:
        STATS["errors"]["uncaught " + type(exc).__name__] += 1
        raise AssertionError(f"P1: {type(exc).__name__} escaped instead of a TensorAttnError: {exc}") from exc
    return "ok", result


# ------------------------------------------------------------------------------ specs and arrays

CUSTOM = {
    "bilinear3": ta.Spec("bilinear3", "ia,jb,kab->ijk"),
    "quad": ta.Spec("quad", "id,jd,kd,ld->ijkl"),
    "outer": ta.Spec("outer", "id,jd,kd->ijk", value="je,kf->ief"),
    "summed": ta.Spec("summed", "iab,jab->ij", value="jef->ie"),
    # attention polynomials beyond the built-ins: a 3-hop chain with coefficients (a tree), a star,
    # a one-slot term (a per-key bias) and a 4-cycle (the general path over key tuples)
    "chain": ta.Spec("chain", "id,jd->ij + jd,kd->jk + kd,ld->kl", coefficients=(1.0, -0.5, 0.75)),
    "star": ta.Spec("star", "id,jd->ij + id,kd->ik"),
    "biased": ta.Spec("biased", "id,jd->ij + jd,kd->jk + kd->k"),
    "cycle4": ta.Spec("cycle4", "id,jd->ij + jd,kd->jk + kd,ld->kl + ld,id->li"),
}
#: spec -> largest n and m (the float64 reference materializes n * m^(k-1) scores)
NMAX = {"pairwise": 9, "rope": 9, "relative": 8, "triple": 6, "bilinear3": 4, "quad": 3, "outer": 4, "summed": 6,
        "strassen": 6, "tree": 6, "chain": 4, "star": 6, "biased": 6, "cycle4": 3}
SPECS = list(NMAX)
BACKENDS = ["auto", "exact", "poly", "sdpa", "favor", "taylor2"]
FLOAT_KEYS = ["np:float16", "np:float32", "np:float64", "torch:float16", "torch:bfloat16", "torch:float32",
              "torch:float64", "list:float64"]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
MAGNITUDES = [1.0, 1.0, 1.0, 0.5, 2.0, 0.0, 1e-3, 8.0, 1e-20, 1e-40, 1e4, 1e20, 1e38, 1e200]
SPECIALS = [math.nan, math.inf, -math.inf]


def get_spec(name: str) -> ta.Spec:
    return CUSTOM[name] if name in CUSTOM else ta.get_spec(name)


def convert(a: np.ndarray, key: str, requires_grad: bool = False):
    kind, name = key.split(":")
    with quiet():
        if kind == "list":
            return a.tolist()
        if kind == "np":
            return a.astype(name)
        t = torch.from_numpy(np.ascontiguousarray(a)).to(TORCH[name])
        return t.requires_grad_(True) if requires_grad else t


def to64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Case:
    spec: str
    backend: str
    causal: bool
    lead: tuple
    n: int
    ms: tuple
    sizes: dict
    vsizes: dict
    keys: dict  # operand -> dtype key
    options: dict
    arrays: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)  # key_padding_mask / attn_mask, as passed

    def args(self):
        nk = len(self.ms)
        ks = [self.arrays[f"k{i}"] for i in range(nk)]
        vs = [self.arrays[f"v{i}"] for i in range(nk)]
        return (self.arrays["q"], ks[0], vs[0]) if nk == 1 else (self.arrays["q"], tuple(ks), tuple(vs))

    def finite(self) -> bool:
        return all(np.isfinite(to64(a)).all() for a in self.arrays.values())

    def describe(self) -> str:
        shapes = {k: tuple(np.shape(v)) if not isinstance(v, torch.Tensor) else tuple(v.shape)
                  for k, v in self.arrays.items()}
        opts = {k: ("<W>" if k == "rel" else v) for k, v in self.options.items()}
        opts.update({k: f"<{type(v).__name__} {tuple(np.shape(v))} {getattr(v, 'dtype', '')}>"
                     for k, v in self.masks.items()})
        return f"{self.spec} backend={self.backend} causal={self.causal} shapes={shapes} dtypes={self.keys} {opts}"


def operand_shapes(spec: ta.Spec, lead, n, ms, sizes, vsizes):
    features, ve = spec.slots.features, spec.value_einsum  # one feature string per slot, query first
    q = (*lead, n, *[sizes[c] for c in features[0]])
    ks = [(*lead, m, *[sizes[c] for c in f]) for m, f in zip(ms, features[1:])]
    vs = [(*lead, m, *[vsizes[c] for c in letters]) for m, letters in zip(ms, ve.value_letters)]
    return q, ks, vs


@st.composite
def cases(draw, specs=SPECS, backends=BACKENDS, dtype_keys=FLOAT_KEYS, magnitudes=MAGNITUDES, wild=True,
          grad=False):
    """A drawn attention call: spec, backend, shapes, dtypes, values and options."""
    name = draw(st.sampled_from(specs))
    spec = get_spec(name)
    nk = spec.order - 1
    nmax = NMAX[name]
    backend = draw(st.sampled_from(backends))
    causal = draw(st.booleans())
    lead = draw(st.sampled_from([(), (), (1,), (2,), (2, 3), (0,), (1, 0)] if wild else [(), (1,), (2,)]))
    n = draw(st.integers(0 if wild else 1, nmax))
    options: dict[str, Any] = {}
    if causal and draw(st.integers(0, 2)) == 0:
        options["q_offset"] = draw(st.integers(0, 3))
        ms = (min(nmax, n + options["q_offset"]) or 1,) * nk
    elif causal:
        ms = (n if n else 1,) * nk
    else:
        ms = tuple(draw(st.integers(0 if wild and draw(st.integers(0, 15)) == 0 else 1, nmax)) for _ in range(nk))
    if spec.positional:
        sizes = {"d": draw(st.sampled_from([2, 4, 2, 1, 3, 0] if wild else [2, 4]))}
    else:
        dmax = 2 if name in ("bilinear3", "summed") else 3
        sizes = {c: draw(st.integers(0 if wild and draw(st.integers(0, 15)) == 0 else 1, dmax))
                 for c in spec.contracted}
    letters = sorted(set("".join(spec.value_einsum.value_letters)))
    vsizes = {c: draw(st.integers(0 if wild else 1, 3)) for c in letters}
    names = ["q", *(f"k{i}" for i in range(nk)), *(f"v{i}" for i in range(nk))]
    base = draw(st.sampled_from(dtype_keys))
    keys = {nm: base for nm in names}
    if wild and not base.startswith("list") and draw(st.integers(0, 5)) == 0:  # one operand in another dtype
        kind = base.split(":")[0]
        keys[draw(st.sampled_from(names))] = draw(st.sampled_from([k for k in dtype_keys if k.startswith(kind)]))
    mags = {nm: draw(st.sampled_from(magnitudes)) for nm in names} if draw(st.booleans()) else \
        dict.fromkeys(names, draw(st.sampled_from(magnitudes)))
    options["scale"] = draw(st.sampled_from([None, None, None, 0.125, np.float32(0.25), 1.0, 0.0, -0.5, 1e-3, 10.0,
                                             1e-30, 1e30, 1e39] if wild else [None, 0.125, 0.5]))
    options["tol"] = draw(st.sampled_from([1e-1, 1e-2, 1e-3, 1e-3, 1e-5]))
    options["on_unbounded"] = draw(st.sampled_from(["raise", "fallback", "ignore"]))
    if name == "rope":
        options["rope_layout"] = draw(st.sampled_from(["interleaved", "half"]))
        options["rope_base"] = draw(st.sampled_from([10000.0, 100.0, 2.0]))
    if wild and draw(st.integers(0, 5)) == 0:
        options["memory_budget"] = draw(st.sampled_from([1, 64, 4096]))
    seed = draw(st.integers(0, 2**31 - 1))
    case = Case(name, backend, causal, lead, n, ms, sizes, vsizes, keys, options)
    rng = np.random.default_rng(seed)
    qs, kss, vss = operand_shapes(spec, lead, n, ms, sizes, vsizes)
    raw = {"q": rng.uniform(-1, 1, qs) * mags["q"]}
    for i in range(nk):
        raw[f"k{i}"] = rng.uniform(-1, 1, kss[i]) * mags[f"k{i}"]
        raw[f"v{i}"] = rng.uniform(-1, 1, vss[i]) * mags[f"v{i}"]
    if name == "relative":
        d = sizes["d"]
        length = max(0, options.get("q_offset", 0) + n + ms[0] - 1)
        raw["rel"] = rng.uniform(-1, 1, (length, d, d)) / math.sqrt(max(d, 1))
        keys["rel"] = base if not base.startswith("list") else "np:float64"
        if draw(st.booleans()):
            options["alibi_slope"] = draw(st.sampled_from([0.25, 0.0, 2.0, 1e39] if wild else [0.25, 1.0]))
    if wild and draw(st.integers(0, 5)) == 0:  # NaN / Inf somewhere
        nm = draw(st.sampled_from(sorted(raw)))
        if raw[nm].size:
            raw[nm].flat[draw(st.integers(0, raw[nm].size - 1))] = draw(st.sampled_from(SPECIALS))
    for nm, a in raw.items():
        case.arrays[nm] = convert(a, keys[nm], grad and nm != "rel")
    if "rel" in case.arrays:
        options["rel"] = case.arrays["rel"]
    return case


def reference(case: Case) -> np.ndarray:
    """float64 brute force on the inputs as given (already rounded to their dtypes)."""
    spec = get_spec(case.spec)
    nk = spec.order - 1
    q = to64(case.arrays["q"])
    ks = [to64(case.arrays[f"k{i}"]) for i in range(nk)]
    vs = [to64(case.arrays[f"v{i}"]) for i in range(nk)]
    D = math.prod(case.sizes[c] for c in spec.contracted)
    scale = case.options["scale"]
    kw: dict[str, Any] = dict(spec=spec, causal=case.causal, q_offset=case.options.get("q_offset", 0),
                              scale=1.0 / math.sqrt(D) if scale is None else float(scale))
    if case.spec == "rope":
        kw.update(rope_base=case.options["rope_base"], rope_layout=case.options["rope_layout"])
    if case.spec == "relative":
        kw.update(rel=to64(case.arrays["rel"]), alibi_slope=case.options.get("alibi_slope"))
    for name, mask in case.masks.items():
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        kw[name] = m if m.dtype == bool else m.astype(np.float64)
    with quiet():
        return reference_attention(q, ks[0] if nk == 1 else ks, vs[0] if nk == 1 else vs, **kw)


def result_dtype(q) -> str:
    return str(q.dtype if isinstance(q, (torch.Tensor, np.ndarray)) else np.asarray(q).dtype).rsplit(".", 1)[-1]


def check_output(case: Case, out, *, leading=None) -> None:
    """P4: container, dtype and shape follow q."""
    q = case.arrays["q"]
    spec = get_spec(case.spec)
    want = (*(case.lead if leading is None else leading), case.n,
            *[case.vsizes[c] for c in spec.value_einsum.out_letters])
    if isinstance(q, torch.Tensor):
        assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.device == q.device, "P4: torch in"
    else:
        assert isinstance(out, np.ndarray) and out.dtype == np.asarray(q).dtype, "P4: numpy in -> numpy out"
    assert tuple(out.shape) == want, f"P4: shape {tuple(out.shape)} != {want}"


def check_finite_output(case: Case, out) -> None:
    """P2."""
    if case.finite() and not np.isfinite(to64(out)).all():
        STATS["nan_for_finite_input"] += 1
        raise AssertionError("P2: non-finite output for finite input")


def check_certificate(case: Case, out, info) -> None:
    """P3 against the float64 reference."""
    if info.error_bound is None or not case.finite() or to64(out).size == 0:
        return
    ref = reference(case)
    if not np.isfinite(ref).all():
        return  # the float64 reference itself overflowed: nothing to compare with
    err = float(np.abs(to64(out) - ref).max())
    bound = float(info.error_bound)
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
    for stats in (STATS["certificates"][result_dtype(case.arrays["q"])],
                  STATS["certificates"][f"{result_dtype(case.arrays['q'])} {info.backend}"]):
        stats["checked"] += 1
        if ratio > stats["worst_ratio"]:
            stats["worst_ratio"], stats["worst_case"] = ratio, case.describe()
        stats["violations"] += not err <= bound
    if not err <= bound:
        raise AssertionError(f"P3: max|out - exact| = {err:.3e} > error_bound = {bound:.3e} ({info.backend})")


def attention_call(case: Case, **extra):
    q, k, v = case.args()
    return call(ta.attention, q, k, v, spec=get_spec(case.spec), backend=case.backend, causal=case.causal,
                return_info=True, **case.options, **case.masks, **extra)


def check_attention(case: Case) -> None:
    """P1 (inside ``call``), then P4, P2 and P3 on the result when the call succeeded."""
    status, res = attention_call(case)
    if status != "ok":
        return
    out, info = res
    check_output(case, out)
    check_finite_output(case, out)
    check_certificate(case, out, info)


@st.composite
def masked_cases(draw):
    """A valid call (moderate values, every float dtype) with a key padding mask and/or an attention
    mask: bool or float, rows with every key masked, causal masks given as masks, general masks."""
    case = draw(cases(specs=["pairwise", "triple", "rope", "relative", "strassen", "tree", "star"],
                      backends=["exact", "poly", "auto"], dtype_keys=HALF_AND_FLOAT, wild=False,
                      magnitudes=[0.25, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    m, n, lead = case.ms[0], case.n, case.lead
    torch_in = isinstance(case.arrays["q"], torch.Tensor)
    wrap = (lambda a: torch.from_numpy(a)) if torch_in else (lambda a: a)
    kinds = draw(st.sets(st.sampled_from(["kpm_bool", "kpm_float", "attn_causal", "attn_general"]), min_size=1,
                         max_size=2))
    if len(set(case.ms)) == 1 and "kpm_bool" in kinds:
        kpm = rng.random((*lead, m)) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        case.masks["key_padding_mask"] = wrap(kpm)
    elif len(set(case.ms)) == 1 and "kpm_float" in kinds:
        bias = rng.uniform(-2.0, 1.0, (*lead, m))
        bias[rng.random(bias.shape) < 0.3] = -np.inf
        case.masks["key_padding_mask"] = wrap(bias)
    if len(case.ms) == 1 and not case.causal and "q_offset" not in case.options:
        if "attn_causal" in kinds and n == m:
            case.masks["attn_mask"] = wrap(np.triu(np.ones((n, m), bool), 1))  # runs as causal=True
        elif "attn_general" in kinds:
            case.masks["attn_mask"] = wrap(rng.random((n, m)) < 0.4)
    return case


# ------------------------------------------------------------------------------------- attention

@given(case=cases())
def test_attention(case: Case):
    """P1-P4 for ta.attention over every spec, backend, dtype and shape."""
    count("test_attention")
    note(case.describe())
    check_attention(case)


HALF_AND_FLOAT = ["np:float16", "np:float32", "np:float64", "torch:float16", "torch:bfloat16", "torch:float32",
                  "torch:float64"]


@given(case=masked_cases())
def test_masks(case: Case):
    """P1-P4 with key padding and attention masks (the float64 reference applies the same masks;
    a row with every key masked is 0 there, and must be here, within the bound)."""
    count("test_masks")
    note(case.describe())
    case.options["on_unbounded"] = "ignore"
    check_attention(case)


@given(case=cases(backends=["exact", "poly", "auto"], dtype_keys=HALF_AND_FLOAT, wild=False,
                  magnitudes=[0.25, 0.5, 0.8, 1.0, 1.2]),
       autocast=st.booleans())
def test_certificate_every_dtype(case: Case, autocast: bool):
    """P3 on valid, moderate inputs in every dtype: exact and poly results within info.error_bound,
    also when the call runs inside a torch.autocast region (mixed-precision training)."""
    count("test_certificate_every_dtype")
    note(case.describe() + f" autocast={autocast}")
    case.options["on_unbounded"] = "ignore"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        check_attention(case)


@given(case=cases(specs=["pairwise", "triple", "rope", "relative", "bilinear3", "strassen", "tree"], backends=BACKENDS,
                  dtype_keys=["torch:float32", "torch:float64", "torch:bfloat16"],
                  magnitudes=[0.5, 1.0, 1.0, 1e-3, 8.0, 1e20], wild=False, grad=True),
       double=st.booleans(), autocast=st.booleans())
def test_gradients(case: Case, double: bool, autocast: bool):
    """P1/P2 for backward through every backend, and double backward (create_graph=True); with
    ``autocast`` the call and its backward run inside a torch.autocast region."""
    count("test_gradients")
    note(case.describe() + f" double={double} autocast={autocast}")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _gradients(case, double)


def _gradients(case: Case, double: bool) -> None:
    status, res = attention_call(case)
    if status != "ok":
        return
    out, info = res
    leaves = [a for nm, a in case.arrays.items() if nm != "rel" and a.requires_grad]
    assert out.requires_grad, "the output must stay in the graph"
    d_out = torch.ones_like(out)

    def backward():
        grads = torch.autograd.grad(out, leaves, d_out, create_graph=double, allow_unused=True)
        if double:
            total = sum(g.float().square().sum() for g in grads if g is not None and g.requires_grad)
            if isinstance(total, torch.Tensor):
                torch.autograd.grad(total, leaves, allow_unused=True)
        return grads

    status, grads = call(backward)
    if status != "ok":
        return
    for g, leaf in zip(grads, leaves):
        if g is not None:
            assert g.dtype == leaf.dtype and g.shape == leaf.shape
            if case.finite() and np.isfinite(to64(out)).all():
                assert torch.isfinite(g).all(), "P2: non-finite gradient for finite input"
    check_gradient_certificate(case, out, info, d_out, grads)


def check_gradient_certificate(case: Case, out, info, d_out, grads) -> None:
    """P3 for gradients: poly's ``grad_bound_for`` against float64 exact gradients of the very inputs
    the call saw, where its gradient certificate exists, in every dtype (the cast back to fp16/bf16
    included)."""
    if (info.backend != "poly" or info.grad is None or not case.finite() or not np.isfinite(to64(out)).all()
            or to64(out).size == 0):
        return  # exact's bound is 0: it is the reference the poly bound is measured against
    names = [nm for nm, a in case.arrays.items() if nm != "rel" and a.requires_grad]
    wide = {nm: a.detach().double().requires_grad_(nm in names) for nm, a in case.arrays.items()}
    nk = len(case.ms)
    ks, vs = [wide[f"k{i}"] for i in range(nk)], [wide[f"v{i}"] for i in range(nk)]
    options = {**case.options, **({"rel": wide["rel"]} if "rel" in wide else {})}
    status, exact = call(ta.attention, wide["q"], ks[0] if nk == 1 else tuple(ks), vs[0] if nk == 1 else tuple(vs),
                         spec=get_spec(case.spec), backend="exact", causal=case.causal, **options, **case.masks)
    if status != "ok" or not np.isfinite(to64(exact)).all():
        return
    ref = torch.autograd.grad(exact, [wide[nm] for nm in names], d_out.double(), allow_unused=True)
    bounds = ta.grad_bound_for(info, d_out, by_input=True)
    label = {"q": "q", **{f"k{i}": ("k" if nk == 1 else f"k[{i}]") for i in range(nk)},
             **{f"v{i}": ("v" if nk == 1 else f"v[{i}]") for i in range(nk)}}
    stats = STATS["certificates"][f"{result_dtype(case.arrays['q'])} gradients"]
    for nm, g, r in zip(names, grads, ref):
        if g is None or r is None or not torch.isfinite(r).all():
            continue
        err = float((g.detach().double() - r).abs().max()) if g.numel() else 0.0
        bound = bounds[label[nm]]
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        stats["checked"] += 1
        if ratio > stats["worst_ratio"]:
            stats["worst_ratio"], stats["worst_case"] = ratio, case.describe() + f" input {nm}"
        stats["violations"] += not err <= bound
        assert err <= bound, f"P3 (gradients): max|grad {nm} - exact| = {err:.3e} > {bound:.3e} ({info.backend})"


# ------------------------------------------------------------------------- dtypes and containers

def _exotic(kind: str, a: np.ndarray):
    """``a`` (float64) as an unusual array: every numpy dtype kind, odd containers, torch dtypes."""
    with quiet():
        if kind.startswith("np:"):
            name = kind[3:]
            special = {
                "str": lambda: a.astype(str), "bytes": lambda: a.astype("S8"),
                "datetime64": lambda: (a * 100).astype("int64").astype("datetime64[s]"),
                "timedelta64": lambda: (a * 100).astype("int64").astype("timedelta64[s]"),
                "object_float": lambda: a.astype(object),
                "masked": lambda: np.ma.masked_array(a.astype(np.float32), mask=a > 0.5),
                "masked_none": lambda: np.ma.masked_array(a.astype(np.float32)),
                "reversed": lambda: a.astype(np.float32)[..., ::-1, :] if a.ndim >= 2 else a,
                "fortran": lambda: np.asfortranarray(a.astype(np.float32)),
                "scalar": lambda: np.float32(0.5), "python_float": lambda: 0.5, "none": lambda: None,
                "ragged": lambda: [[1.0, 2.0], [3.0]], "list": lambda: a.tolist(), "text": lambda: "q",
            }
            if name == "structured":
                out = np.zeros(a.shape, dtype=[("x", "f4"), ("y", "f4")])
                out["x"] = a
                return out
            if name == "object_mixed":
                o = a.astype(object)
                if o.size:
                    o.flat[0] = "x"
                return o
            return special[name]() if name in special else a.astype(name)
        name = kind[6:]
        t = torch.from_numpy(np.ascontiguousarray(a))
        special = {
            "meta": lambda: torch.empty(a.shape, device="meta"), "sparse": lambda: t.float().to_sparse(),
            "nested": lambda: torch.nested.nested_tensor([t.float()]) if a.ndim >= 1 else t.float(),
            "scalar": lambda: torch.tensor(0.5), "transposed": lambda: t.float().transpose(-1, -2).contiguous().mT,
            "requires_grad": lambda: t.float().requires_grad_(True),
        }
        return special[name]() if name in special else t.to(getattr(torch, name))


NUMPY_KINDS = ["str", "bytes", "datetime64", "timedelta64", "structured", "object_float", "object_mixed", "masked",
               "masked_none", "reversed", "fortran", "scalar", "python_float", "none", "ragged", "list", "text",
               "longdouble", "clongdouble", "complex64", "complex128", "bool", "int8", "uint8", "int16", "int32",
               "int64", "uint64", "float16", "float32", "float64"]
TORCH_KINDS = ["meta", "sparse", "nested", "scalar", "transposed", "requires_grad", "float8_e4m3fn", "float8_e5m2",
               "float8_e4m3fnuz", "float8_e5m2fnuz", "complex64", "complex128", "bool", "uint8", "int8", "int16",
               "int32", "int64", "uint16", "uint32", "uint64", "float16", "bfloat16", "float32", "float64"]
EXOTIC = ["np:" + x for x in NUMPY_KINDS] + ["torch:" + x for x in TORCH_KINDS if x in {
    "meta", "sparse", "nested", "scalar", "transposed", "requires_grad"} or hasattr(torch, x)]


@given(kind=st.sampled_from(EXOTIC), where=st.sampled_from(["q", "k", "v", "all", "rel"]),
       spec=st.sampled_from(["pairwise", "triple", "rope", "relative"]), backend=st.sampled_from(BACKENDS),
       n=st.integers(1, 5), d=st.sampled_from([2, 4]), seed=st.integers(0, 1000))
def test_every_dtype_and_container(kind, where, spec, backend, n, d, seed):
    """P1 and P4 when q, k, v or rel is of any numpy / torch dtype or an odd container."""
    assume(where != "rel" or spec == "relative")
    count("test_every_dtype_and_container")
    note(f"{kind} in {where}, {spec}, {backend}")
    rng = np.random.default_rng(seed)
    nk = ta.get_spec(spec).order - 1
    plain = (lambda a: torch.from_numpy(a).float()) if kind.startswith("torch") else (lambda a: a.astype(np.float32))
    q = _exotic(kind, rng.uniform(-1, 1, (n, d))) if where in ("q", "all") else plain(rng.uniform(-1, 1, (n, d)))
    ks = [_exotic(kind, rng.uniform(-1, 1, (n, d))) if where in ("k", "all") else plain(rng.uniform(-1, 1, (n, d)))
          for _ in range(nk)]
    vs = [_exotic(kind, rng.uniform(-1, 1, (n, d))) if where in ("v", "all") else plain(rng.uniform(-1, 1, (n, d)))
          for _ in range(nk)]
    options = {}
    if spec == "relative":
        W = rng.uniform(-1, 1, (2 * n - 1, d, d)) / d
        options["rel"] = _exotic(kind, W) if where in ("rel", "all") else plain(W)
    status, out = call(ta.attention, q, ks[0] if nk == 1 else tuple(ks), vs[0] if nk == 1 else tuple(vs), spec=spec,
                       backend=backend, on_unbounded="ignore", **options)
    if status != "ok":
        return
    if isinstance(q, torch.Tensor):
        assert isinstance(out, torch.Tensor) and out.dtype == q.dtype, "P4"
    else:
        assert isinstance(out, np.ndarray) and out.dtype == np.asarray(q).dtype, "P4"
    assert np.isfinite(to64(out)).all(), "P2"


# ------------------------------------------------------------------------------------- keywords

class _Opaque:
    def __float__(self):
        raise RuntimeError("no float")


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
    st.sampled_from([np.float32(0.125), np.float64(1e-3), np.float16(0.1), np.int64(3), np.int32(0), np.uint8(7),
                     np.bool_(True), np.float64("nan"), torch.tensor(0.5), torch.tensor(2), 1 + 2j, [1], (0.1,),
                     {"a": 1}, b"x", _Opaque(), -0.0, 1e39, 1e-39, "raise", "fallback", "ignore", "exact", "poly",
                     "auto", "sdpa", "favor", "taylor2", "chebyshev", "taylor", "interleaved", "half", "pairwise",
                     "triple", "yes", "true", 0.5, 1e-3, 10000.0, 64 << 20, 4096, 1, 0, -5, 2**53, 2**63,
                     np.eye(2), torch.eye(2)]),
)
KEYWORDS = ["scale", "tol", "causal", "on_unbounded", "backend", "spec", "q_offset", "memory_budget", "max_degree",
            "max_rank", "approximant", "degree", "feature_dtype", "need_grad", "features", "seed", "rope_base",
            "rope_layout", "alibi_slope", "rel", "return_info", "bogus"]


def _real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _finite(x) -> bool:
    try:
        return _real(x) and math.isfinite(float(x))
    except OverflowError:
        return False


def must_refuse(kw: str, x) -> bool:
    """Values that are clearly wrong for ``kw``: bools are not numbers, strings are not bools."""
    finite = _finite(x)
    if kw == "return_info":
        return not isinstance(x, (bool, np.bool_))
    if kw in ("scale", "tol", "rope_base", "alibi_slope") and x is not None:
        return not finite
    if kw in ("causal", "need_grad") and x is not None:
        return not isinstance(x, (bool, np.bool_))
    if kw in ("q_offset", "memory_budget", "max_degree", "max_rank", "degree", "features", "seed"):
        return x is not None and not (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)))
    return kw == "bogus"


@given(kw=st.sampled_from(KEYWORDS), value=ANY_VALUE, backend=st.sampled_from(BACKENDS), torch_in=st.booleans())
def test_keywords(kw, value, backend, torch_in):
    """P1 for any value of every keyword, and clearly wrong values are refused (never silently used)."""
    count("test_keywords")
    note(f"{kw}={value!r} backend={backend}")
    spec = {"rope_base": "rope", "rope_layout": "rope", "alibi_slope": "relative", "rel": "relative"}.get(
        kw, "pairwise")
    rng = np.random.default_rng(0)
    q, k, v = (rng.uniform(-0.3, 0.3, (2, 5, 4)).astype(np.float32) for _ in range(3))
    if torch_in:
        q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    kwargs: dict[str, Any] = {"spec": spec, "backend": backend}
    if spec == "relative" and kw != "rel":
        kwargs["rel"] = np.eye(4, dtype=np.float32)[None].repeat(9, 0) * 0.5
    kwargs[kw] = value
    status, res = call(ta.attention, q, k, v, **kwargs)
    if status == "ok":
        assert not must_refuse(kw, value), f"{kw}={value!r} was accepted"
        out = res[0] if isinstance(res, tuple) else res
        assert np.isfinite(to64(out)).all(), "P2"


# ------------------------------------------------------------------------------ plan, check_bounds

PLAN_NUMBERS = st.one_of(st.integers(-3, 5), st.sampled_from([64, 1024, 65536, 10**9, 10**30, 1024.0, 0.5, math.nan,
                                                               math.inf, -1.0, None, True, "64", np.int64(64),
                                                               np.float64(8.0), [8]]))
PLAN_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([1.0, 0.5, 2.5, 0.0, -1.0, None, True, "1", np.float32(1.0), 1e308, 2**2000]))


@given(spec=st.sampled_from(["pairwise", "triple", "rope", "relative", "bilinear3", "quad"]),
       n=PLAN_NUMBERS, d=PLAN_NUMBERS, bound=PLAN_FLOATS,
       extra=st.dictionaries(
           st.sampled_from(["m", "e", "tol", "scale", "batch", "causal", "beta", "backend", "on_unbounded", "dtype",
                            "sizes", "q_offset", "rel", "alibi_slope", "max_degree"]),
           st.one_of(PLAN_NUMBERS, PLAN_FLOATS, st.booleans(),
                     st.sampled_from(["poly", "exact", "auto", "float64", "float32", "bfloat16", "float16", "int8",
                                      torch.float32, np.float32, "ignore", "fallback", {"d": 2}, {"a": 2, "b": 0},
                                      {"x": 1}, np.ones((3, 2, 2)), np.full((3, 2, 2), np.nan)])),
           max_size=3))
def test_plan(spec, n, d, bound, extra):
    """P1 for ta.plan with any arguments; a returned plan prints and has a finite or no error bound."""
    count("test_plan")
    kw = dict(n=n, d=d, bound=bound, **extra)
    if isinstance(d, int) and not isinstance(d, bool) and d > 16:
        kw["d"] = 8  # keep the rank arithmetic small
    note(repr(kw))
    status, plan = call(ta.plan, get_spec(spec), **kw)
    if status == "ok":
        call(repr, plan)
        assert plan.error_bound is None or plan.error_bound >= 0  # never NaN


@given(case=cases(specs=["pairwise", "triple", "rope", "relative", "bilinear3"], backends=["auto"]),
       drop_v=st.booleans())
def test_check_bounds(case: Case, drop_v: bool):
    """P1 for ta.check_bounds, with and without values."""
    count("test_check_bounds")
    note(case.describe())
    q, k, v = case.args()
    options = {key: val for key, val in case.options.items() if key != "memory_budget"}
    status, plan = call(ta.check_bounds, q, k, None if drop_v else v, spec=get_spec(case.spec), causal=case.causal,
                        **options)
    if status == "ok":
        call(repr, plan)


# ------------------------------------------------------------------------------------ nn modules

@given(spec=st.sampled_from(["pairwise", "triple", "rope", "relative", "quad", "bilinear3", 3, None, "nope"]),
       backend=st.sampled_from(BACKENDS + ["nope", 3]), tol=st.sampled_from([1e-3, 1e-2, 0, 2, np.float64(1e-3), "x"]),
       scale=st.sampled_from([None, 0.25, np.float32(0.25), True, math.nan, "x"]),
       causal=st.sampled_from([False, True, "yes", None]), lead=st.sampled_from([(), (2,), (0,), (2, 1)]),
       n=st.integers(0, 6), d=st.sampled_from([0, 1, 2, 4]), e=st.sampled_from([0, 1, 3]),
       dtype=st.sampled_from(["float32", "float64", "float16", "bfloat16"]), seed=st.integers(0, 100),
       call_causal=st.sampled_from([None, False, True]))
def test_tensor_attention_module(spec, backend, tol, scale, causal, lead, n, d, e, dtype, seed, call_causal):
    """P1/P2/P4 for ta.nn.TensorAttention: construction with any settings, forward with drawn inputs."""
    count("test_tensor_attention_module")
    note(f"{spec} {backend} tol={tol!r} scale={scale!r} causal={causal!r} lead={lead} n={n} d={d} e={e} {dtype}")
    status, module = call(ta.nn.TensorAttention, CUSTOM.get(spec, spec), backend=backend, tol=tol, causal=causal,
                          scale=scale)
    if status != "ok":
        return
    assert not isinstance(scale, (bool, str)) and isinstance(causal, bool), "invalid setting accepted"
    spec_obj = module.spec
    nk = spec_obj.order - 1
    rng = np.random.default_rng(seed)
    qs, kss, vss = operand_shapes(spec_obj, lead, n, (n,) * nk, {c: d for c in spec_obj.contracted},
                                  {c: e for c in set("".join(spec_obj.value_einsum.value_letters))})
    make = lambda s: torch.from_numpy(rng.uniform(-0.5, 0.5, s)).to(TORCH[dtype])  # noqa: E731
    q, ks, vs = make(qs), [make(s) for s in kss], [make(s) for s in vss]
    extra = {"rel": torch.eye(max(d, 1))[:d, :d].expand(max(0, 2 * n - 1), d, d) * 0.5} if spec == "relative" else {}
    status, out = call(module, q, ks[0] if nk == 1 else tuple(ks), vs[0] if nk == 1 else tuple(vs),
                       causal=call_causal, **extra)
    if status != "ok":
        return
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype, "P4"
    assert tuple(out.shape) == (*lead, n, *(e for _ in spec_obj.value_einsum.out_letters)), "P4"
    assert torch.isfinite(out.float()).all(), "P2"


@given(embed_dim=st.sampled_from([8, 4, 6, 0, -4, 8.0, True, np.int64(8)]),
       num_heads=st.sampled_from([1, 2, 4, 3, 0, -1]),
       spec=st.sampled_from(["pairwise", "triple", "rope", "relative", "quad", "bilinear3"]),
       backend=st.sampled_from(BACKENDS), batch_first=st.sampled_from([True, False, "yes"]),
       kdim=st.sampled_from([None, 4, 0, -1]), vdim=st.sampled_from([None, 4, 0]),
       dropout=st.sampled_from([0.0, 0.1, math.nan, "x"]), qk_norm=st.sampled_from([None, 1.0, 0.0, True, math.inf]),
       dtype=st.sampled_from([None, torch.float64, torch.float16, torch.bfloat16, torch.int64, "float32"]),
       in_dtype=st.sampled_from(["same", "float32", "float64"]), N=st.sampled_from([0, 1, 2]),
       L=st.sampled_from([0, 1, 5]), S=st.sampled_from([None, 0, 1, 3]), unbatched=st.booleans(),
       wrong_features=st.integers(0, 6), is_causal=st.sampled_from([None, False, True]), seed=st.integers(0, 100))
def test_multihead_module(embed_dim, num_heads, spec, backend, batch_first, kdim, vdim, dropout, qk_norm, dtype,
                          in_dtype, N, L, S, unbatched, wrong_features, is_causal, seed):
    """P1/P2/P4 for ta.nn.MultiheadTensorAttention: any constructor arguments, drawn inputs."""
    count("test_multihead_module")
    note(f"E={embed_dim!r} H={num_heads} {spec} {backend} kdim={kdim} vdim={vdim} dtype={dtype} in={in_dtype} "
         f"N={N} L={L} S={S} unbatched={unbatched}")
    status, mha = call(ta.nn.MultiheadTensorAttention, embed_dim, num_heads, CUSTOM.get(spec, spec), bias=True,
                       batch_first=batch_first, kdim=kdim, vdim=vdim, dropout=dropout, backend=backend,
                       qk_norm=qk_norm, dtype=dtype, on_unbounded="ignore")
    if status != "ok":
        return
    assert not isinstance(embed_dim, bool) and not isinstance(qk_norm, bool), "a bool was taken for a number"
    assert (kdim is None or kdim > 0) and (vdim is None or vdim > 0), "kdim / vdim <= 0 accepted"
    rng = np.random.default_rng(seed)
    xdt = mha.q_proj.weight.dtype if in_dtype == "same" else TORCH[in_dtype]
    S_ = L if S is None else S

    def make(length, features):
        batched = (N, length, features) if mha.batch_first else (length, N, features)
        shape = (length, features) if unbatched else batched
        return torch.from_numpy(rng.uniform(-1, 1, shape)).to(xdt)

    query = make(L, mha.embed_dim + (1 if wrong_features == 0 else 0))
    key = make(S_, mha.kdim) if S is not None else None
    value = make(S_, mha.vdim) if S is not None else None
    extra = {}
    if spec == "relative":
        hd = mha.head_dim
        extra["rel"] = torch.eye(hd, dtype=torch.float64).expand(max(0, L + S_ - 1), hd, hd).contiguous()
    status, res = call(mha, query, key, value, is_causal=is_causal, **extra)
    if status != "ok":
        return
    out, _ = res
    want = (L, mha.embed_dim) if unbatched else ((N, L, mha.embed_dim) if mha.batch_first else (L, N, mha.embed_dim))
    assert tuple(out.shape) == want and out.dtype == query.dtype, "P4"
    assert torch.isfinite(out.float()).all(), "P2"


# ------------------------------------------------------------------------------------------ specs

@given(name=st.one_of(st.sampled_from(["s", "my_spec", "", "1x", None, 3]), st.text(max_size=3)),
       score=st.one_of(st.text(alphabet="ijkldab,->. 1", max_size=14),
                       st.sampled_from(["id,jd->ij", "ia,jb,kab->ijk", "id,jd,kd->ijk", None, 3, b"id,jd->ij"])),
       value=st.one_of(st.none(), st.text(alphabet="ijkef,->", max_size=10), st.just(3)),
       positional=st.sampled_from([None, "rope", "relative", "x", 3, ["rope"]]),
       options=st.sampled_from([{}, None, {"rel": None}, 3, {1: 2}, {"rope_base": 5.0}]),
       backend=st.sampled_from(["exact", "poly", "auto"]))
def test_specs(name, score, value, positional, options, backend):
    """P1 for ta.Spec with any arguments (SpecError only); a valid spec runs on exact and poly."""
    count("test_specs")
    note(f"{name!r} {score!r} {value!r} {positional!r} {options!r}")
    status, spec = call(ta.Spec, name, score, value, positional, options)
    if status != "ok":
        return
    call(lambda: (repr(spec), hash(spec), spec == spec))
    rng = np.random.default_rng(0)
    qs, kss, vss = operand_shapes(spec, (), 3, (3,) * (spec.order - 1), {c: 2 for c in spec.contracted},
                                  {c: 2 for c in set("".join(spec.value_einsum.value_letters))})
    q = rng.uniform(-0.3, 0.3, qs)
    ks, vs = [rng.uniform(-0.3, 0.3, s) for s in kss], [rng.uniform(-1, 1, s) for s in vss]
    extra = {"rel": np.eye(2)[None].repeat(5, 0)} if spec.positional == "relative" else {}
    nk = spec.order - 1
    status, out = call(ta.attention, q, ks[0] if nk == 1 else tuple(ks), vs[0] if nk == 1 else tuple(vs), spec=spec,
                       backend=backend, on_unbounded="ignore", **extra)
    if status == "ok":
        assert np.isfinite(out).all(), "P2"


# -------------------------------------------------------------------------------------------- CLI

CLI_INTS = st.sampled_from(["64", "1024", "2000", "1", "0", "-5", "nan", "inf", "1e3", "1024.0", "x", ""])
CLI_FLOATS = st.sampled_from(["1", "0.5", "2.5", "0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "x"])


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _malformed_check(opts: dict) -> bool:
    def num(text, kind):
        try:
            return kind(text)
        except (TypeError, ValueError):
            return None

    n, d, m = (num(opts.get(k), int) for k in ("--n", "--d", "--m"))
    B, tol = num(opts.get("--B"), float), num(opts.get("--tol", "1e-3"), float)
    bad = [n is None or n < 1, d is None or d < 1, "--m" in opts and (m is None or m < 1),
           B is None or not math.isfinite(B) or B < 0, tol is None or not 0 < tol < 1,
           "--causal" in opts and "--m" in opts and m != n, opts.get("--spec", "pairwise") not in ta.list_specs()]
    return any(bad)


@given(opts=st.fixed_dictionaries(
    {"--n": CLI_INTS, "--d": st.sampled_from(["0", "1", "4", "8", "-2", "nan", "1.5"]), "--B": CLI_FLOATS},
    optional={"--spec": st.sampled_from(["pairwise", "triple", "rope", "relative", "nope"]), "--m": CLI_INTS,
              "--tol": st.sampled_from(["1e-3", "0", "1", "nan", "-1", "0.5", "inf"]),
              "--scale": st.sampled_from(["1/d", "1/sqrt(d)", "0.125", "nan", "inf", "-1", "0", "1/0"]),
              "--causal": st.just(None), "--max-degree": st.sampled_from(["-1", "0", "3", "40", "1000", "x"]),
              "--max-rank": st.sampled_from(["-1", "0", "1", "100"])}))
def test_cli_check(opts):
    """P1 for ``tensorattn check``: exit 0/1/2, never a traceback; malformed arguments exit 2 with one error line."""
    count("test_cli_check")
    argv = ["check"] + [x for key, val in opts.items() for x in ([key] if val is None else [key, val])]
    note(" ".join(argv))
    status, res = call(_run_cli, argv)
    assert status == "ok"
    code, out, err = res
    assert code in (0, 1, 2)
    if _malformed_check(opts):
        assert code == 2, f"malformed arguments exited {code}"
    if code == 2:
        assert sum("error" in line for line in err.splitlines()) == 1 and "Traceback" not in err


BENCH_BAD = [["--backend", "nope"], ["--spec", "nope"], ["--n", "0"], ["--n", "-5"], ["--d", "0"], ["--B", "-1"],
             ["--B", "nan"], ["--B", "inf"], ["--tol", "0"], ["--tol", "2"], ["--tol", "nan"], ["--threads", "-3"],
             ["--threads", "0"], ["--suite", "nope"], ["--parts", "nope"], ["--causal", "maybe"]]


class _Started(Exception):
    pass


@given(bad=st.sampled_from(BENCH_BAD + [[]]), extra=st.sampled_from([[], ["--spec", "pairwise"], ["--n", "64"]]))
def test_cli_bench(bad, extra, tmp_path_factory):
    """``tensorattn bench`` refuses a malformed argument (exit 2, one error line) before it starts."""
    count("test_cli_bench")
    import tensorattn.bench as bench

    def started(*args, **kwargs):
        raise _Started

    argv = ["bench", "--suite", "micro", "--no-progress", "--no-plots", "--out",
            str(tmp_path_factory.getbasetemp() / "bench")] + extra + bad
    note(" ".join(argv))
    saved, threads = bench.run_bench, torch.get_num_threads()
    bench.run_bench = started
    try:
        code, out, err = _run_cli(argv)
    except _Started:
        code = None
    finally:
        bench.run_bench = saved
        torch.set_num_threads(threads)
    if bad:
        assert code == 2, f"{bad} was not refused before the benchmark started"
        assert sum("error" in line for line in err.splitlines()) == 1 and "Traceback" not in err
