"""Experiments beyond the timing sweep: error vs rank, the phase transition (plans and measured
fixed-degree error), the needle experiment, the GEMM share of a poly run, and the peak RSS of exact
attention in a fresh process."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from .. import api
from ..approx.features import rank_for
from ..errors import BoundError
from ..planning import plan as make_plan_for_sizes
from ..planning import threshold
from ..spec import get_spec
from ..testing import random_inputs
from .suites import Suite


def _as_args(q, k, v, order):
    t = torch.from_numpy
    if order == 2:
        return t(q), t(k), t(v)
    return t(q), tuple(t(x) for x in k), tuple(t(x) for x in v)


def poly_at_degree(q, k, v, *, spec: str, degree: int, scale: float, dtype: str = "float64"):
    """Poly with the degree pinned (not chosen by tol) and features in ``dtype``, through the
    public API. Returns (out, certified bound on max|out - exact| at that degree)."""
    out, info = api.attention(q, k, v, spec=spec, backend="poly", scale=scale, degree=degree, feature_dtype=dtype,
                              on_unbounded="ignore", return_info=True)
    return out, info.error_bound


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def rank_experiment(suite: Suite, progress=None) -> dict:
    """Max error vs rank at equal rank: poly of degree g (rank C(d+g, g)), FAVOR+ with that many
    features (several seeds), and taylor2 (rank C(d+2, 2)). Pairwise, n = rank_n, d = 8, B = 1."""
    n, d = suite.rank_n, 8
    q, k, v = _as_args(*random_inputs("pairwise", n, d, seed=1, dtype=np.float32), 2)
    ref = api.attention(q.double(), k.double(), v.double(), backend="exact", scale=1 / d)
    points = []
    degrees = list(suite.rank_degrees)
    it = progress(degrees, desc="error vs rank", unit="degree") if progress else degrees
    for g in it:
        r = rank_for(d, g)
        out, bound = poly_at_degree(q, k, v, spec="pairwise", degree=g, scale=1 / d, dtype="float32")
        points.append(dict(method="poly", rank=r, degree=g, seed=None, max_error=_max_err(out, ref),
                           error_bound=bound))
        for seed in suite.favor_seeds:
            out = api.attention(q, k, v, backend="favor", scale=1 / d, features=r, seed=seed)
            points.append(dict(method="favor", rank=r, degree=None, seed=seed, max_error=_max_err(out, ref),
                               error_bound=None))
    out = api.attention(q, k, v, backend="taylor2", scale=1 / d)
    points.append(dict(method="taylor2", rank=rank_for(d, 2), degree=2, seed=None, max_error=_max_err(out, ref),
                       error_bound=None))
    _, info = api.attention(q, k, v, backend="poly", scale=1 / d, return_info=True)
    return dict(n=n, d=d, B=1.0, tol=1e-3, points=points, certified_degree=info.degree,
                certified_rank=info.rank)


def phase_plans(suite: Suite, tol: float = 1e-3, d: int = 8) -> dict:
    """Degree and rank ``ta.plan`` needs for ``tol`` as the entry bound B grows (scale 1/d, so the
    worst-case score radius is beta = B^k), and the predicted exact/poly flop ratio per n."""
    out = {}
    for k, spec in ((2, "pairwise"), (3, "triple")):
        tau_max = threshold(k, max(suite.plan_ns))
        Bs = np.linspace(0.05, 1.6 * tau_max, suite.plan_points)
        per_n = []
        for n in suite.plan_ns:
            rows = []
            for B in Bs:
                p = make_plan_for_sizes(spec, n=n, d=d, bound=float(B), scale=1 / d, tol=tol)
                rows.append(dict(B=float(B), beta=p.beta, degree=p.degree, rank=p.rank, passed=p.passed,
                                 flops_exact=p.flops_exact, flops_poly=p.flops_poly))
            per_n.append(dict(n=n, tau=threshold(k, n), points=rows))
        out[str(k)] = dict(spec=spec, d=d, tol=tol, sizes=per_n)
    return out


def term_phase_plans(spec, ns, points: int, *, d: int = 8, tol: float = 1e-3) -> dict:
    """Per term, the degree and rank ``ta.plan`` needs for ``tol`` as the entry bound B of q and the
    keys grows, from sizes alone (no data; scale 1/d, so every term's own entry bound B_t equals B),
    and each term's threshold tau_{k_t}(n) = (ln n)^(1/k_t). A single-term spec is one term over
    all of its slots. Ranks are None where no degree <= max_degree certifies tol."""
    sp = get_spec(spec)
    exprs = [t.expr for t in sp.terms] if sp.is_polynomial else [sp.score]
    orders = [t.order for t in sp.terms] if sp.is_polynomial else [sp.order]
    tau_max = max(threshold(k, max(ns)) for k in orders)
    Bs = np.linspace(0.05, 1.6 * tau_max, points)
    sizes = []
    for n in ns:
        rows = []
        for B in Bs:
            p = make_plan_for_sizes(sp, n=n, d=d, bound=float(B), scale=1 / d, tol=tol)
            cert = p.certificate
            if cert is None:
                degrees = ranks = None
            elif sp.is_polynomial:
                degrees, ranks = list(cert.degrees), list(cert.ranks)
            else:
                degrees, ranks = [cert.degree], [cert.rank]
            term_B = [t.B for t in p.problem.terms] if sp.is_polynomial else [p.B]
            rows.append(dict(B=float(B), beta=p.beta, term_B=term_B, degrees=degrees, ranks=ranks, passed=p.passed,
                             method=p.poly_method, flops_exact=p.flops_exact, flops_poly=p.flops_poly))
        sizes.append(dict(n=n, taus=[threshold(k, n) for k in orders], points=rows))
    return dict(spec=sp.name, terms=exprs, orders=orders, d=d, tol=tol, sizes=sizes)


def fixed_degree_experiment(suite: Suite, progress=None, tol: float = 1e-3) -> dict:
    """Measured error of poly at a fixed degree (the one certified for tol at B = tau_k(n)/2) as the
    entry bound B crosses tau_k(n), against the float64 exact result."""
    out = {}
    jobs = [(k, n, d, ratio) for k, n, d in suite.fixed_sizes for ratio in suite.fixed_ratios]
    it = progress(jobs, desc="fixed degree vs B", unit="point") if progress else jobs
    degrees = {}
    for k, n, d, ratio in it:
        spec = "pairwise" if k == 2 else "triple"
        tau = threshold(k, n)
        if k not in degrees:
            degrees[k] = make_plan_for_sizes(spec, n=n, d=d, bound=tau / 2, scale=1 / d, tol=tol).degree
        g = degrees[k]
        B = ratio * tau
        q, kk, v = _as_args(*random_inputs(spec, n, d, bound=B, seed=2, dtype=np.float64), k)
        ref = api.attention(q, kk, v, spec=spec, backend="exact", scale=1 / d)
        vmax = float(np.prod([float(x.abs().max()) for x in ([v] if k == 2 else v)]))
        try:
            got, bound = poly_at_degree(q, kk, v, spec=spec, degree=g, scale=1 / d)
            err = _max_err(got, ref) / vmax
        except BoundError:  # beta past what any degree certifies: the planner runs no polynomial there
            err = bound = None
        need = make_plan_for_sizes(spec, n=n, d=d, bound=B, scale=1 / d, tol=tol)
        entry = out.setdefault(str(k), dict(spec=spec, n=n, d=d, degree=g, rank=rank_for(d, g), tau=tau,
                                            points=[]))
        entry["points"].append(dict(B=B, ratio=ratio, max_error=err,
                                    error_bound=(bound / vmax) if bound is not None else None,
                                    degree_needed=need.degree))
    return out


def needle_experiment(suite: Suite, progress=None) -> dict:
    """Keys are random +-B vectors in d = 2 log2 n dimensions; query i is a copy of planted key i.
    With scale 1/d the planted score is B^2 and the others are B^2 <s_p, s_j>/d, so the softmax
    weight on the planted key jumps to 1 once e^{B^2} beats the n - 1 others: B^2 ~ ln n."""
    out = []
    it = progress(list(suite.needle_ns), desc="needle", unit="n") if progress else suite.needle_ns
    for n in it:
        d = int(round(2 * math.log2(n)))
        gen = torch.Generator().manual_seed(n)
        signs = torch.randint(0, 2, (n, d), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        nq = min(n, suite.needle_queries)
        dots = signs[:nq] @ signs.T / d  # <s_p, s_j> / d, planted on the diagonal
        xs = np.linspace(0.05, 3.0, suite.needle_points)
        points = []
        for x in xs:
            B2 = float(x * math.log(n))
            s = B2 * dots
            weight = torch.exp(torch.diagonal(s) - torch.logsumexp(s, dim=1))
            # annealed prediction: sum_{j != p} E e^{B^2 z} = (n - 1) cosh(B^2/d)^d
            predicted = 1.0 / (1.0 + (n - 1) * math.exp(d * math.log(math.cosh(B2 / d)) - B2))
            points.append(dict(x=float(x), B=math.sqrt(B2), mean_weight=float(weight.mean()),
                               min_weight=float(weight.min()), max_weight=float(weight.max()),
                               predicted=predicted))
        out.append(dict(n=n, d=d, queries=nq, points=points))
    return dict(sizes=out)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ layer logs start/stop lines to fd 2; keep the console clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def profile_poly(spec: str, n: int, d: int = 8, tol: float = 1e-3) -> dict:
    """One poly call under torch.profiler (entries in [-1, 1], scale 1/d): wall time, self CPU time
    per op, the GEMM share, and the time outside torch ops (validation, planning, Python glue)."""
    from torch.profiler import ProfilerActivity, profile

    order = get_spec(spec).order
    q, k, v = _as_args(*random_inputs(spec, n, d, seed=1, dtype=np.float32), order)
    call = lambda: api.attention(q, k, v, spec=spec, backend="poly", scale=1 / d, tol=tol, return_info=True)  # noqa: E731
    call()
    t0 = time.perf_counter()
    _, info = call()
    plain = time.perf_counter() - t0
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    ops, calls = {}, {}
    for ev in prof.key_averages():
        ops[ev.key] = ops.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
        calls[ev.key] = calls.get(ev.key, 0) + ev.count
    gemm = sum(t for name, t in ops.items() if name in GEMM_OPS)
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return dict(spec=spec, n=n, d=d, degree=info.degree, rank=info.rank, wall_s=wall, unprofiled_s=plain,
                gemm_s=gemm, gemm_calls=sum(c for name, c in calls.items() if name in GEMM_OPS),
                mul_s=ops.get("aten::mul", 0.0), mul_calls=calls.get("aten::mul", 0), profiled_ops_s=total,
                outside_ops_s=max(0.0, wall - total), share=gemm / wall if wall > 0 else None,
                top_ops=[dict(op=name, seconds=t, calls=calls[name]) for name, t in top])


def gemm_share(suite: Suite, d: int = 8, tol: float = 1e-3) -> dict:
    """Share of a poly run's wall time spent in matrix multiplies, pairwise at ``gemm_n``; with the
    same profile of the triple headline size, where fixed per-call costs dominate."""
    out = profile_poly("pairwise", suite.gemm_n, d, tol)
    out["triple"] = profile_poly("triple", suite.triple_target_n, d, tol)
    return out


def _training_step(leaves: list[torch.Tensor], dout: torch.Tensor, **kwargs):
    """One forward + backward through ta.attention; returns the call's AttentionInfo."""
    for x in leaves:
        x.grad = None
    out, info = api.attention(*leaves, return_info=True, **kwargs)
    out.backward(dout.to(out.dtype))
    return info


def grad_experiment(suite: Suite, progress=None, d: int = 8, tol: float = 1e-3) -> dict:
    """A training step (forward + backward) per backend, pairwise, entries in [-1, 1], scale 1/d:
    median time, and the max gradient error over q, k, v against the float64 exact gradient. The
    upstream gradient has rows of unit l1 norm, the normalization of ``info.grad_error_bound``."""
    from .measure import measure

    rows = []
    jobs = [(n, b) for n in suite.grad_ns for b in ("poly", "exact", "sdpa", "favor", "taylor2")]
    it = progress(jobs, desc="forward + backward", unit="case") if progress else jobs
    ref = None
    poly_rank: dict[int, int] = {}
    for n, backend in it:
        q, k, v = _as_args(*random_inputs("pairwise", n, d, seed=4, dtype=np.float32), 2)
        dout = torch.rand(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        dout = dout / dout.sum(-1, keepdim=True)
        if ref is None or ref[0] != n:
            leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
            api.attention(*leaves, backend="exact", scale=1 / d).backward(dout)
            ref = (n, [x.grad for x in leaves])
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        # favor runs at the rank poly chose for the same step (poly runs first for each n)
        extra = {"features": poly_rank.get(n, rank_for(d, 4))} if backend == "favor" else {}
        step = functools.partial(_training_step, leaves, dout, backend=backend, scale=1 / d, tol=tol, **extra)
        timing, info = measure(step, warmup=suite.warmup, repeats=suite.repeats, min_repeats=suite.min_repeats,
                               max_seconds=suite.max_case_seconds)
        err = max(_max_err(x.grad, r) for x, r in zip(leaves, ref[1]))
        degree, rank = {"poly": (info.degree, info.rank), "favor": (None, extra.get("features")),
                        "taylor2": (2, rank_for(d, 2))}.get(backend, (None, None))
        if backend == "poly" and rank:
            poly_rank[n] = rank
        rows.append(dict(n=n, backend=backend, median_s=timing.median, repeats=timing.repeats, max_grad_error=err,
                         grad_error_bound=getattr(info, "grad_error_bound", None), degree=degree, rank=rank))
    return dict(d=d, tol=tol, rows=rows)


_RSS_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
import tensorattn as ta
from tensorattn.bench.measure import process_peak_rss_mib

n, d, rows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
q, k, v = (torch.from_numpy(rng.uniform(-1, 1, (n, d)).astype(np.float32)) for _ in range(3))
ta.attention(q[:64], k[:256], v[:256], backend="exact", scale=1 / d)
before = process_peak_rss_mib()
t0 = time.perf_counter()
out = ta.attention(q[:rows], k, v, backend="exact", scale=1 / d)
seconds = time.perf_counter() - t0
print(json.dumps(dict(before_mib=before, peak_mib=process_peak_rss_mib(), seconds=seconds,
                      finite=bool(torch.isfinite(out).all()))))
"""


def exact_peak_rss(suite: Suite, d: int = 8) -> dict:
    """Peak RSS (VmHWM) of a fresh process that runs exact pairwise attention with n keys over
    ``suite.rss_rows`` query rows (all rows when None). The process includes Python, torch and the
    inputs, so this is the whole footprint, not a delta."""
    n = suite.target_n
    rows = n if suite.rss_rows is None else min(n, suite.rss_rows)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n), str(d), str(rows)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return dict(n=n, d=d, rows=rows, error=proc.stderr.strip().splitlines()[-1:] or ["failed"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(n=n, d=d, rows=rows, peak_rss_mib=res["peak_mib"], before_call_rss_mib=res["before_mib"],
                seconds=res["seconds"], finite=res["finite"], dense_scores_mib=n * n * 4 / 2**20)
