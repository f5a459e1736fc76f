"""Peak memory of forward + backward: streaming exact attention vs a naive autograd softmax.

Run:  python benchmarks/backward_memory.py [--quick]

Each configuration runs in a fresh subprocess, which reports the growth of its peak resident set
size (VmHWM) over a warm-up baseline. The exact backend's backward recomputes each tile from the
saved per-row log-sum-exp (as flash attention does), so training memory stays O(n * block): a few
tiles, sized by ``memory_budget`` ("exact": the default 64 MiB, of which a tile step uses at most
8 MiB for the cache; "exact-1MiB": 1 MiB), plus O(n)
state. The naive implementation keeps the full score and probability tensors for autograd: O(n^2)
for pairwise, O(n^3) for triple; it is skipped where the dense scores alone exceed 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import tensorattn as ta
from tensorattn.bench.measure import in_fresh_process
from tensorattn.bench.measure import process_peak_rss_mib as peak_rss_mib


def naive(spec: str, q, ks, vs):
    """Materialize every score, softmax over all key tuples, autograd keeps them all."""
    expr = {"pairwise": "...id,...jd->...ij", "triple": "...id,...jd,...kd->...ijk"}[spec]
    s = torch.einsum(expr, q, *ks) / q.shape[-1] ** 0.5
    nk = len(ks)
    p = torch.softmax(s.reshape(*s.shape[:-nk], -1), dim=-1).reshape(s.shape)
    vexpr = {"pairwise": "...ij,...je->...ie", "triple": "...ijk,...je,...ke->...ie"}[spec]
    return torch.einsum(vexpr, p, *vs)


def child(spec: str, impl: str, n: int, d: int) -> dict:
    rng = np.random.default_rng(0)
    nk = 1 if spec == "pairwise" else 2

    def leaf():
        return torch.tensor(rng.uniform(-1, 1, (n, d)).astype(np.float32), requires_grad=True)

    q, ks, vs = leaf(), [leaf() for _ in range(nk)], [leaf() for _ in range(nk)]
    small = [x[:8].detach().requires_grad_(True) for x in [q, *ks, *vs]]  # warm up imports and caches
    budget = {"exact": 64 << 20, "exact-1MiB": 1 << 20}.get(impl)  # exact's tile budget (memory_budget)
    run = (lambda a, b, c: naive(spec, a, b, c)) if impl == "naive" else (
        lambda a, b, c: ta.attention(a, b[0] if nk == 1 else b, c[0] if nk == 1 else c, spec=spec, backend="exact",
                                     memory_budget=budget))
    run(small[0], small[1: 1 + nk], small[1 + nk:]).sum().backward()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    out = run(q, ks, vs)
    out.sum().backward()
    seconds = time.perf_counter() - t0
    return {"spec": spec, "impl": impl, "n": n, "d": d,
            "peak_rss_growth_mib": round(peak_rss_mib() - before, 1),
            "inputs_mib": round((1 + 2 * nk) * n * d * 4 / 2**20, 2),
            "dense_scores_mib": round(n ** (nk + 1) * 4 / 2**20, 1),
            "seconds": round(seconds, 2), "finite": bool(torch.isfinite(q.grad).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--child", nargs=3, metavar=("SPEC", "IMPL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec, impl, n = args.child
        print(json.dumps(child(spec, impl, int(n), args.d)))
        return
    sizes = {"pairwise": [1024, 4096] if args.quick else [2048, 8192, 32768],
             "triple": [64, 128] if args.quick else [64, 128, 256]}
    naive_limit_mib = 1024  # skip naive configurations whose dense scores alone exceed this
    rows = []
    for spec, ns in sizes.items():
        for n in ns:
            for impl in ("exact", "exact-1MiB", "naive"):
                nk = 1 if spec == "pairwise" else 2
                if impl == "naive" and n ** (nk + 1) * 4 / 2**20 > naive_limit_mib:
                    continue
                rows.append(in_fresh_process(__file__, "--d", args.d, "--child", spec, impl, n))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| spec | impl | n | peak RSS growth (MiB) | dense scores (MiB) | inputs (MiB) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['impl']} | {r['n']:,} | {r['peak_rss_growth_mib']} | {r['dense_scores_mib']} | "
              f"{r['inputs_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
