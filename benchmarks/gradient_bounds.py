"""Measured gradient error of the poly backend vs its certified bound (docs/torch.md).

Run:  python benchmarks/gradient_bounds.py

For each case, float64 inputs uniform in [-bound, bound], a random upstream gradient dO, and the
gradients w.r.t. q, keys and values from backend='poly' and backend='exact'. Prints, per input, the
measured max |grad_poly - grad_exact| and the bound from ta.grad_bound_for(info, dO); the ratio
must be <= 1 (the worst key and value slot are shown). The last row is an adversarial 1-d case
(keys at scores +-beta) where the bound is nearly attained.
"""

from __future__ import annotations

import numpy as np
import torch

import tensorattn as ta
from tensorattn.testing import random_inputs


def measure(spec, q, k, v, *, causal=False, tol=1e-3, **opts):
    grads, dO = {}, None
    for backend in ("exact", "poly"):
        ks = list(k) if isinstance(k, tuple) else [k]
        vs = list(v) if isinstance(v, tuple) else [v]
        leaves = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in (q, *ks, *vs)]
        nk = len(ks)
        k_arg = leaves[1] if nk == 1 else tuple(leaves[1: 1 + nk])
        v_arg = leaves[1 + nk] if nk == 1 else tuple(leaves[1 + nk:])
        out, info = ta.attention(leaves[0], k_arg, v_arg, spec=spec, backend=backend, causal=causal, tol=tol,
                                 on_unbounded="ignore", return_info=True, **opts)
        if dO is None:
            dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out.backward(dO)
        grads[backend] = [x.grad for x in leaves]
        if backend == "poly":
            poly_info = info
    bounds = ta.grad_bound_for(poly_info, dO, by_input=True)
    errors = {n: float((a - b).abs().max()) for n, a, b in zip(poly_info.grad.names, grads["exact"], grads["poly"])}
    return poly_info, errors, bounds


def main() -> None:
    cases = []
    for spec, n, d in [("pairwise", 256, 8), ("triple", 32, 4), ("rope", 256, 8)]:
        for causal in (False, True):
            for tol in (1e-3, 1e-1):
                q, k, v = random_inputs(spec, n=n, d=d, bound=1.0, dtype=np.float64, seed=1)
                cases.append((f"{spec}{', causal' if causal else ''}, n={n}, d={d}, tol={tol:g}",
                              measure(spec, q, k, v, causal=causal, tol=tol)))
    q = np.array([[1.0]])
    k = np.array([[1.0]] + [[-1.0]] * 10)
    v = np.array([[1.0]] + [[-1.0]] * 10)
    cases.append(("adversarial pairwise, beta=1, tol=1e-3", measure("pairwise", q, k, v, scale=1.0)))
    print("| case | degree | q: measured / bound | keys | values |")
    print("|---|---|---|---|---|")
    for name, (info, errors, bounds) in cases:
        assert all(errors[x] <= bounds[x] for x in errors), (name, errors, bounds)
        cells = [worst_cell(errors, bounds, prefix) for prefix in "qkv"]
        print(f"| {name} | {info.degree} | {' | '.join(cells)} |")


def worst_cell(errors: dict, bounds: dict, prefix: str) -> str:
    worst = max((x for x in errors if x.startswith(prefix)), key=lambda x: errors[x] / bounds[x])
    return f"{errors[worst]:.1e} / {bounds[worst]:.1e} = {errors[worst] / bounds[worst]:.1e}"


if __name__ == "__main__":
    main()
