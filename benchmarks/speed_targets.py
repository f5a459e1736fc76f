"""Speed targets: per-call cost, causal poly, the FFT path and the fused feature pass, as ratios from one run.

The targets are those of docs/design.md#performance-targets.

Run:  python benchmarks/speed_targets.py [--threads 1] [--repeats 7] [--out benchmarks/latest/speed_targets]

Every ratio compares two timings taken in this process, interleaved (a, b, a, b, ...) so that load
from other processes hits both alike; the median of each is used. A reference that takes seconds
(triple exact, causal SDPA) is called once, between two halves of the calls it is compared with
(``around``). Entries are uniform in [-1, 1],
float32, scale 1/d, tol 1e-3, batch 1. For every line the other processes' share of the CPU
during its timed calls (``LoadProbe``) and the 1-minute load average are recorded. Writes
``<out>.json`` and ``<out>.md`` (a table that benchmarks/publish.py puts into benchmarks/README.md).
"""
# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import tensorattn as ta
from tensorattn.approx.features import augment, feature_map
from tensorattn.bench.measure import LoadProbe, load_average
from tensorattn.testing import random_rel

HERE = Path(__file__).resolve().parent


def uniform(rng, *shape):
    return torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in turns; plus the foreign CPU share."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    with LoadProbe() as probe:
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["foreign_load"] = probe.foreign
    out["load1"] = (load_average() or [None])[0]
    return out


def around(slow, fns: dict, repeats: int, warmup: int = 1) -> tuple[float, dict]:
    """One timed call of ``slow`` (seconds) with the functions ``fns`` timed in turns, half of their
    repeats before it and half after, so that a drift of the machine's speed during the slow call
    moves both sides of the ratio alike. Returns the slow time and, per function, the mean of the two
    halves' medians (the foreign CPU share: the largest of the three parts)."""
    half = max(1, repeats // 2)
    before = interleaved(fns, half, warmup)
    with LoadProbe() as probe:
        t0 = time.perf_counter()
        slow()
        took = time.perf_counter() - t0
    after = interleaved(fns, half, 0)
    m = {k: statistics.median([before[k], after[k]]) for k in fns}
    m["foreign_load"] = max((x for x in (before["foreign_load"], after["foreign_load"], probe.foreign)
                             if x is not None), default=None)
    m["load1"] = after["load1"]
    return took, m


def line(name: str, target: str, value: float, met: bool, detail: str, m: dict) -> dict:
    return dict(workload=name, target=target, value=value, met=met, detail=detail,
                foreign_load=m.get("foreign_load"), load1=m.get("load1"))


def per_call(rng, repeats: int) -> list[dict]:
    d = 8
    out = []
    for n in (64, 256):
        q, k, v = (uniform(rng, 1, n, d) for _ in range(3))
        fresh = [[uniform(rng, 1, n, d) for _ in range(3)] for _ in range(repeats * 20 + 20)]
        it = iter(fresh)
        m = interleaved({
            "poly": lambda: ta.attention(q, k, v, backend="poly", scale=1 / d),
            "poly_fresh": lambda: ta.attention(*next(it), backend="poly", scale=1 / d),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1 / d),
        }, repeats * 20, warmup=5)
        form = ta.plan("pairwise", n=n, d=d, bound=1.0, scale=1 / d, backend="poly").poly_form
        detail = (f"poly {m['poly'] * 1e3:.3f} ms (new inputs every call: {m['poly_fresh'] * 1e3:.3f} ms), SDPA "
                  f"{m['sdpa'] * 1e3:.3f} ms; form {form}")
        if n == 64:
            out.append(line("per-call fixed cost (pairwise poly, n = 64)", "≤ 0.2 ms", m["poly_fresh"] * 1e3,
                            m["poly_fresh"] <= 2e-4, detail + f"; poly / SDPA = {m['poly_fresh'] / m['sdpa']:.1f}×",
                            m))
        else:
            r = m["poly_fresh"] / m["sdpa"]
            out.append(line("pairwise poly, n = 256, vs SDPA at n = 256", "≤ 3× SDPA's time", r, r <= 3, detail, m))
    return out


def triple(rng, repeats: int) -> dict:
    n, d = 1024, 8
    q = uniform(rng, 1, n, d)
    ks, vs = [uniform(rng, 1, n, d) for _ in range(2)], [uniform(rng, 1, n, d) for _ in range(2)]
    kw = dict(spec="triple", scale=1 / d)
    exact, m = around(lambda: ta.attention(q, ks, vs, backend="exact", **kw),
                      {"poly": lambda: ta.attention(q, ks, vs, backend="poly", **kw)}, repeats * 6, warmup=3)
    r = exact / m["poly"]
    return line("triple poly vs triple exact, n = 1,024", "≥ 2,000×", r, r >= 2000,
                f"poly {m['poly'] * 1e3:.2f} ms, exact {exact:.2f} s (one call, between the two halves of the poly "
                f"calls)", m)


def causal(rng, repeats: int) -> list[dict]:
    n, d = 16384, 8
    q, k, v = (uniform(rng, 1, n, d) for _ in range(3))
    sdpa, m = around(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1 / d, is_causal=True), {
        "causal": lambda: ta.attention(q, k, v, backend="poly", scale=1 / d, causal=True),
        "full": lambda: ta.attention(q, k, v, backend="poly", scale=1 / d),
    }, repeats + 1)
    r1 = m["causal"] / m["full"]
    r2 = sdpa / m["causal"]
    return [
        line("causal pairwise poly vs non-causal poly, n = 16,384", "≤ 2×", r1, r1 <= 2,
             f"causal {m['causal'] * 1e3:.1f} ms, non-causal {m['full'] * 1e3:.1f} ms", m),
        line("causal pairwise poly vs causal SDPA, n = 16,384", "≥ 20× faster", r2, r2 >= 20,
             f"causal SDPA {sdpa * 1e3:.0f} ms (one call, between the two halves of the poly calls), "
             f"causal poly {m['causal'] * 1e3:.1f} ms", m),
    ]


def relative(rng, repeats: int, sizes: tuple[int, ...]) -> list[dict]:
    d = 4
    per = {}
    loads = []
    for n in sizes:
        q, k, v = (uniform(rng, n, d) for _ in range(3))
        W = torch.from_numpy(random_rel(n, n, d, kind="rope"))
        _, info = ta.attention(q, k, v, spec="relative", rel=W, scale=1 / d, backend="poly", return_info=True)
        g = info.degree
        reps = repeats if n <= 32768 else 1
        m = interleaved({
            "relative": lambda: ta.attention(q, k, v, spec="relative", rel=W, scale=1 / d, backend="poly"),
            "pairwise": lambda: ta.attention(q, k, v, scale=1 / d, backend="poly", degree=g),
        }, reps, warmup=0 if n > 32768 else 1)
        per[n] = dict(m, degree=g, terms=info.plan.relative.terms, rank=math.comb(d + g, g))
        loads.append(m)
    out = []
    if 32768 in per:
        p = per[32768]
        r = p["relative"] / p["pairwise"]
        out.append(line("relative poly vs pairwise poly at equal rank, n = 32,768", "≤ 25×", r, r <= 25,
                        f"relative {p['relative'] * 1e3:.0f} ms (degree {p['degree']}, {p['terms']} terms), pairwise "
                        f"at the same degree (rank {p['rank']}) {p['pairwise'] * 1e3:.1f} ms", p))
    lo, hi = min(per), max(per)
    if hi > lo:
        growth = (per[hi]["relative"] / per[hi]["terms"]) / (per[lo]["relative"] / per[lo]["terms"])
        nlogn = (hi * math.log(hi)) / (lo * math.log(lo))
        r = growth / nlogn
        worst = max(loads, key=lambda x: x.get("foreign_load") or 0.0)
        detail = "; ".join(f"n = {n:,}: {p['relative'] * 1e3:.0f} ms, {p['terms']} terms" for n, p in per.items())
        detail += f"; n log n grows {nlogn:.1f}×"
        g = per[hi]["degree"]
        if per[lo]["degree"] != g:  # the same n range at one degree: time alone, without the change of degree
            q, k, v = (uniform(rng, lo, d) for _ in range(3))
            W = torch.from_numpy(random_rel(lo, lo, d, kind="rope"))
            m = interleaved({"relative": lambda: ta.attention(q, k, v, spec="relative", rel=W, scale=1 / d,
                                                              backend="poly", degree=g)}, repeats, warmup=1)
            same = per[hi]["relative"] / m["relative"]
            detail += (f"; at degree {g} for both (n = {lo:,} pinned to it: {m['relative'] * 1e3:.0f} ms) the time "
                       f"grows {same:.1f}×, {same / nlogn:.2f}× n log n")
        out.append(line(f"relative poly growth per unit rank, n = {lo:,} → {hi:,}", "within 1.5× of n log n", r,
                        r <= 1.5, detail, worst))
    return out


def fused(rng, repeats: int) -> dict:
    n, d = 65536, 8
    q, k, v = (uniform(rng, 1, n, d) for _ in range(3))
    _, info = ta.attention(q, k, v, backend="poly", scale=1 / d, return_info=True)
    Uk, Uq = feature_map(k, info.degree), feature_map(q, info.degree)  # materialized once, outside the timing
    a = augment(v)
    C = torch.rand(1, info.rank, a.shape[-1])

    def gemms():
        (a.transpose(1, 2) @ Uk).transpose(1, 2)
        C.transpose(1, 2) @ Uq.transpose(1, 2)

    m = interleaved({"poly": lambda: ta.attention(q, k, v, backend="poly", scale=1 / d), "gemms": gemms}, repeats)
    r = m["poly"] / m["gemms"]
    return line(f"pairwise poly, n = 65,536 (rank {info.rank}): time / the same-shape GEMMs alone", "≤ 1.2×", r,
                r <= 1.2, f"poly {m['poly'] * 1e3:.1f} ms, GEMMs on materialized features {m['gemms'] * 1e3:.1f} ms", m)


def markdown(results: dict) -> str:
    lines = [f"Measured {results['date']} with `python benchmarks/speed_targets.py{results['args']}`: "
             f"{results['threads']} torch thread(s), {results['cores']} cores, load average "
             f"{results['load_start']:.1f} at the start and {results['load_end']:.1f} at the end. "
             "\"Other processes\" is their share of the CPU during the timed calls of that line.\n",
             "| workload | target | measured | met | details | other processes / load avg |",
             "|---|---|---:|---|---|---|"]
    for t in results["targets"]:
        v = t["value"]
        val = f"{v:.3f} ms" if "fixed cost" in t["workload"] else (f"{v:,.0f}×" if v >= 100 else f"{v:.2f}×")
        fl = "n/a" if t["foreign_load"] is None else f"{100 * t['foreign_load']:.0f}%"
        la = "n/a" if t["load1"] is None else f"{t['load1']:.1f}"
        lines.append(f"| {t['workload']} | {t['target']} | {val} | {'yes' if t['met'] else '**no**'} | "
                     f"{t['detail']} | {fl} / {la} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--relative-sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--skip", nargs="*", default=[], choices=["per_call", "triple", "causal", "relative", "fused"])
    parser.add_argument("--out", default=str(HERE / "latest" / "speed_targets"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    start = (load_average() or [math.nan])[0]
    targets = []
    if "per_call" not in args.skip:
        targets += per_call(rng, args.repeats)
    if "triple" not in args.skip:
        targets.append(triple(rng, args.repeats))
    if "causal" not in args.skip:
        targets += causal(rng, args.repeats)
    if "relative" not in args.skip:
        targets += relative(rng, max(2, args.repeats // 3), tuple(args.relative_sizes))
    if "fused" not in args.skip:
        targets.append(fused(rng, args.repeats))
    flags = "".join(f" --{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
                    for k, v in vars(args).items() if k not in ("out",) and v not in (None, [], False))
    results = dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), args=flags, threads=torch.get_num_threads(),
                   cores=len(os.sched_getaffinity(0)), load_start=start,
                   load_end=(load_average() or [math.nan])[0], targets=targets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
