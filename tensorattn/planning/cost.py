"""Flop model for exact vs polynomial attention; used by the planner for backend="auto"."""

from __future__ import annotations

import math

#: flops charged per exp and per softmax bookkeeping in the exact backend
EXP_FLOPS = 10
#: poly's measured slowdown per counted flop relative to exact (gathers, cumsums); auto uses it
POLY_OVERHEAD = 2.0
#: key tuples per tile of the exact backend (the block of every key slot is about its (k-1)-th root)
EXACT_TILE_TUPLES = 1024
#: most bytes one exact tile step works in, below any larger memory budget: a step's tile and its
#: temporaries then stay in cache. Measured on 2-core CPU (pairwise, float32, one thread): n = 4,096,
#: forward + backward 2.3-2.5 s at 4-16 MiB against 4.1-4.3 s at the 64 MiB default budget
EXACT_STEP_BYTES = 8 << 20


def exact_key_blocks(ms: tuple[int, ...]) -> tuple[int, ...]:
    """Keys per block of each slot in the exact backend's tiles (its roundoff bound counts them too)."""
    side = max(1, int(round(EXACT_TILE_TUPLES ** (1.0 / len(ms)))))
    return tuple(max(1, min(m, side)) for m in ms)


#: time per counted flop of poly's direct form relative to its factorized form (the score GEMM has
#: inner size D and Horner is elementwise, against the factorized form's feature-GEMMs); the plan
#: picks the direct form when it is cheaper by this measure (benchmarks/speed_targets.py)
DIRECT_OVERHEAD = 0.75


def exact_flops(Z: int, n: int, ms: tuple[int, ...], D: int, E: int, causal: bool) -> int:
    k = len(ms) + 1
    tuples = n * math.prod(ms)
    if causal:
        tuples //= k  # j_m <= i for every slot: sum_i i^(k-1) ~ n^k / k
    per = 2 * D * (k - 1) + 2 * E * (k - 1) + EXP_FLOPS
    return Z * tuples * per


def poly_flops(Z: int, n: int, ms: tuple[int, ...], r: int, E: int, value_dims: list[int], causal: bool) -> int:
    features = (n + sum(ms)) * r
    stats = sum(2 * m * r * (e + 1) for m, e in zip(ms, value_dims))
    combine = r * (E + 1) * (len(ms) - 1) * (n if causal else 1)
    queries = 2 * n * r * (E + 1)
    prefix = sum(m * r * (e + 1) for m, e in zip(ms, value_dims)) if causal else 0
    return Z * (features + stats + combine + queries + prefix)


def direct_flops(Z: int, n: int, m: int, D: int, E: int, g: int) -> int:
    """Poly's direct form: scores (2D), Horner (2g) and the value GEMM (2(E+1)) per (query, key)."""
    return Z * n * m * (2 * D + 2 * g + 2 * (E + 1))


def polynomial_exact_flops(spec, Z: int, n: int, ms: tuple[int, ...], term_dims: tuple[int, ...], E: int,
                           causal: bool) -> int:
    """Exact attention-polynomial cost for the algorithm its structure allows.

    A tree passes one softmax message per edge (O(N_parent N_child (D + E)) each); a cycle of
    2-slot terms over 3 slots (the Strassen triangle) is matrix products over (i, j, k)
    (O(n m^2 E) multiply-adds, GEMM-shaped); anything else visits every key tuple."""
    sizes = (n, *ms)
    structure, path = spec.structure, spec.exact_path
    if path == "tree":
        total = 0
        for child, parent in enumerate(structure.parent):
            if parent is None:
                continue
            D = sum(d for t, d in zip(structure.terms, term_dims) if set(t.slots) <= {child, parent})
            pairs = sizes[parent] * sizes[child] // (2 if causal else 1)
            total += pairs * (2 * D + 2 * E + EXP_FLOPS)
        return Z * total
    if path == "triangle":
        D = sum(term_dims)
        scores = (n * ms[0] + ms[0] * ms[1] + n * ms[1]) * (2 * D + EXP_FLOPS)
        return Z * (scores + 2 * n * ms[0] * ms[1] * (E + 1) // (3 if causal else 1))
    k = structure.order
    tuples = n * math.prod(ms) // (k if causal else 1)
    per = sum(2 * d for d in term_dims) + 2 * E * (k - 1) + EXP_FLOPS
    return Z * tuples * per
