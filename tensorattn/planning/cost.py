"""Flop model for exact vs polynomial attention; used by the planner for backend="auto"."""

from __future__ import annotations

import math

#: flops charged per exp and per softmax bookkeeping in the exact backend
EXP_FLOPS = 10
#: poly's measured slowdown per counted flop relative to exact (gathers, cumsums); auto uses it
POLY_OVERHEAD = 2.0
#: key tuples per tile of the exact backend (the block of every key slot is about its (k-1)-th root)
EXACT_TILE_TUPLES = 1024


def exact_key_blocks(ms: tuple[int, ...]) -> tuple[int, ...]:
    """Keys per block of each slot in the exact backend's tiles (its roundoff bound counts them too)."""
    side = max(1, int(round(EXACT_TILE_TUPLES ** (1.0 / len(ms)))))
    return tuple(max(1, min(m, side)) for m in ms)


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
