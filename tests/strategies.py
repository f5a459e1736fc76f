"""Coupled hypothesis strategies: spec, shapes and bounded inputs drawn together, valid by construction."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import tensorattn as ta
from tensorattn.testing import random_inputs, random_rel

CUSTOM = ta.Spec("bilinear3", "ia,jb,kab->ijk")
QUAD = ta.Spec("quad", "id,jd,kd,ld->ijkl")

#: (spec, max n for the float64 brute-force reference)
SPEC_CASES = [
    (ta.get_spec("pairwise"), 40),
    (ta.get_spec("triple"), 14),
    (ta.get_spec("rope"), 40),
    (ta.get_spec("relative"), 24),
    (CUSTOM, 8),
    (QUAD, 6),
]


@st.composite
def attention_cases(draw, specs=None, dtypes=(np.float32, np.float64), allow_causal=True, bound=1.0):
    """Draw (spec, q, k, v, options, causal) for the exact backend and the reference."""
    cases = SPEC_CASES if specs is None else [c for c in SPEC_CASES if c[0].name in specs]
    spec, nmax = draw(st.sampled_from(cases))
    causal = draw(st.booleans()) if allow_causal else False
    n = draw(st.integers(1, nmax))
    m = n if causal else draw(st.integers(1, nmax))
    d = draw(st.sampled_from([2, 4])) if spec.positional else draw(st.integers(1, 4))
    if spec.name == "bilinear3":
        d = draw(st.integers(1, 3))
    e = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**16))
    q, k, v = random_inputs(spec, n=n, d=d, m=m, e=e, batch=batch, bound=bound, dtype=dtype, seed=seed)
    options = {}
    if spec.name == "rope":
        options = {"rope_layout": draw(st.sampled_from(["interleaved", "half"])),
                   "rope_base": draw(st.sampled_from([10000.0, 100.0]))}
    if spec.name == "relative":
        options = {"rel": random_rel(n, m, d, kind=draw(st.sampled_from(["dense", "rope", "identity"])),
                                     seed=seed, dtype=dtype)}
        if draw(st.booleans()):
            options["alibi_slope"] = 0.25
    return spec, q, k, v, options, causal
