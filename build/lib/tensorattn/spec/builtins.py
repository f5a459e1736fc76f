"""The built-in specs, registered explicitly."""

from __future__ import annotations

from .registry import register_spec
from .spec import Spec

PAIRWISE = Spec("pairwise", "id,jd->ij", description="softmax attention, s_ij = scale<q_i, k_j>")
TRIPLE = Spec(
    "triple",
    "id,jd,kd->ijk",
    description="2-simplicial attention over key pairs, s_ijk = scale sum_l q_il k1_jl k2_kl",
)
ROPE = Spec(
    "rope",
    "id,jd->ij",
    positional="rope",
    options={"rope_base": 10000.0, "rope_layout": "interleaved"},
    description="pairwise attention on RoPE-rotated q and k",
)
RELATIVE = Spec(
    "relative",
    "id,jd->ij",
    positional="relative",
    options={"rel": None, "alibi_slope": None},
    description="s_ij = scale q_i^T W[i-j+m-1] k_j for user matrices W (generalized RoPE)",
)

STRASSEN = Spec(
    "strassen",
    "id,jd->ij + jd,kd->jk + kd,id->ki",
    description="Strassen attention over key pairs, s_ijk = scale (<q_i,k1_j> + <k1_j,k2_k> + <k2_k,q_i>)",
)
TREE = Spec(
    "tree",
    "id,jd->ij + jd,kd->jk",
    description="tree attention on the path i-j-k (2-fold composition), s_ijk = scale (<q_i,k1_j> + <k1_j,k2_k>)",
)

BUILTIN_SPECS = (PAIRWISE, TRIPLE, ROPE, RELATIVE, STRASSEN, TREE)


def register_builtins() -> None:
    for spec in BUILTIN_SPECS:
        register_spec(spec, replace=True)
