"""Relative positions: scaling of the FFT-Toeplitz poly path vs exact, and rope poly vs pairwise poly.

Run:  python benchmarks/relative_scaling.py [--sizes 4096 8192 16384] [--exact-rows 512] [--rope-n 65536]

1. spec ``relative`` with d = 4, e = 4, W_t the (block-diagonal, 8 of 16 nonzero) RoPE rotations,
   q, k, v uniform in [-1, 1], scale 1/d, tol 1e-3 (the degree is the plan's): time of
   backend='poly' (FFT path) at each n, and of backend='exact'. Exact's cost is linear in the
   number of query rows, so it is timed on the first ``--exact-rows`` queries and scaled by
   n / rows (the same call also checks those rows of the poly result against its certificate).
2. spec ``rope`` vs ``pairwise`` with backend='poly' at n = 65,536, d = 8, scale 1/8, tol 1e-3, on
   the same q, k, v.

Times are the best of ``--repeats`` runs in one process; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import tensorattn as ta
from tensorattn.bench.measure import best_of
from tensorattn.testing import random_rel


def relative_case(n: int, rows: int, repeats: int, d: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (torch.from_numpy(rng.uniform(-1, 1, (n, d)).astype(np.float32)) for _ in range(3))
    W = torch.from_numpy(random_rel(n, n, d, kind="rope"))
    opts = dict(spec="relative", rel=W, scale=1 / d, tol=1e-3)
    t_poly, (out, info) = best_of(lambda: ta.attention(q, k, v, backend="poly", return_info=True, **opts), repeats)
    rows = min(rows, n)
    Wr = W[: rows + n - 1]  # queries 0..rows-1 read W[i - j + n - 1] <= rows + n - 2
    t_rows, exact_rows = best_of(lambda: ta.attention(q[:rows], k, v, rel=Wr, spec="relative", scale=1 / d,
                                                        backend="exact"), repeats)
    err = float((out[:rows].double() - exact_rows.double()).abs().max())
    rel = info.plan.relative
    return {
        "n": n, "degree": info.degree, "terms": rel.terms, "kernels": rel.kernels, "fft_len": rel.fft_len,
        "poly_s": t_poly, "exact_s_estimated": t_rows * n / rows, "exact_rows_timed": rows,
        "max_err_first_rows": err, "error_bound": info.error_bound,
        "flops_poly": info.flops_poly, "flops_exact": info.flops_exact,
    }


def rope_case(n: int, repeats: int, d: int = 8, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (torch.from_numpy(rng.uniform(-1, 1, (n, d)).astype(np.float32)) for _ in range(3))
    opts = dict(backend="poly", scale=1 / d, tol=1e-3, return_info=True)
    t_pair, (_, ip) = best_of(lambda: ta.attention(q, k, v, spec="pairwise", **opts), repeats)
    t_rope, (_, ir) = best_of(lambda: ta.attention(q, k, v, spec="rope", **opts), repeats)
    return {"n": n, "d": d, "pairwise_poly_s": t_pair, "rope_poly_s": t_rope, "rope_over_pairwise": t_rope / t_pair,
            "degrees": [ip.degree, ir.degree], "ranks": [ip.rank, ir.rank]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--exact-rows", type=int, default=512)
    parser.add_argument("--rope-n", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    relative_case(256, 16, 1)  # warm up imports and caches
    results = [relative_case(n, args.exact_rows, args.repeats) for n in args.sizes]
    rope = rope_case(args.rope_n, args.repeats)
    first, last = results[0], results[-1]
    summary = {
        "threads": torch.get_num_threads(),
        "relative": results,
        "poly_growth": last["poly_s"] / first["poly_s"],
        "exact_growth": last["exact_s_estimated"] / first["exact_s_estimated"],
        "poly_over_exact_at_largest_n": last["poly_s"] / last["exact_s_estimated"],
        "rope": rope,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"relative, d=4, rotations W (8 of 16 nonzero), scale 1/4, tol 1e-3, {summary['threads']} threads")
    print(f"{'n':>7} {'deg':>4} {'terms':>6} {'kernels':>7} {'poly s':>8} {'exact s*':>9} {'poly/exact':>10} "
          f"{'err':>9} {'bound':>9}")
    for r in results:
        print(f"{r['n']:>7} {r['degree']:>4} {r['terms']:>6} {r['kernels']:>7} {r['poly_s']:>8.3f} "
              f"{r['exact_s_estimated']:>9.2f} {r['poly_s'] / r['exact_s_estimated']:>10.4f} "
              f"{r['max_err_first_rows']:>9.2e} {r['error_bound']:>9.2e}")
    print(f"  * exact timed on the first {args.exact_rows} query rows and scaled by n/rows")
    print(f"growth {first['n']} -> {last['n']}: poly {summary['poly_growth']:.2f}x, "
          f"exact {summary['exact_growth']:.2f}x; poly/exact at n={last['n']}: "
          f"{summary['poly_over_exact_at_largest_n']:.4f}")
    print(f"rope vs pairwise poly, n={rope['n']}, d={rope['d']}: {rope['rope_poly_s']:.3f}s vs "
          f"{rope['pairwise_poly_s']:.3f}s -> {rope['rope_over_pairwise']:.3f}x (degrees {rope['degrees']})")


if __name__ == "__main__":
    main()
