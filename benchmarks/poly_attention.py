"""Attention polynomials (tree, Strassen, triple): time and memory against n, headline checks, rank against B.

Run:  python benchmarks/poly_attention.py [--quick] [--parts scaling checks phase] [--out DIR]

Inputs are float32, uniform in [-1, 1] (q, keys and values), ``scale = 1/d``, ``tol = 1e-3``.
Everything runs on one thread (``torch.set_num_threads(1)``); the calls that a ratio compares are
timed in interleaved rounds (``tensorattn.bench.measure.interleaved``: A, B, A, B, ...), which
records each call's wall time and the processor time of its thread. On a shared machine the wall
time of a call stretches with the load, while its processor time stays close to its time alone on
one core; the ratios are of the median processor times (the wall best-of ratios are recorded too).
Peak memory: each case runs once in a fresh subprocess, which reports the growth of its resident
set above the RSS at the call's start (VmHWM after clear_refs) and its whole peak (interpreter,
torch, inputs and the call). Errors are max |out - exact| against the float64 exact backend on the
first query rows. The 1-minute load average is recorded around every measurement.

Writes results.json, time_vs_n.png, memory_vs_n.png, phase_<spec>.png and section.md (the part of
benchmarks/README.md that benchmarks/publish.py inserts) to ``--out`` (default
benchmarks/latest_poly).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import tensorattn as ta
from tensorattn.bench.experiments import profile_poly, term_phase_plans
from tensorattn.bench.measure import PeakMemory, in_fresh_process, interleaved, load_average
from tensorattn.bench.measure import process_peak_rss_mib as peak_rss_mib
from tensorattn.bench.plots import term_phase
from tensorattn.testing import random_inputs

HERE = Path(__file__).resolve().parent
TOL = 1e-3
ERROR_ROWS = 256  # query rows of the float64 reference

FULL = dict(
    sizes={"tree": (1024, 2048, 4096, 8192, 16384), "strassen": (128, 256, 512, 1024, 2048),
           "triple": (64, 128, 256, 512)},
    ds=(4, 8), tree16=(4096, 8192), naive_n=512, strassen_check=(2048, 4), tree_check=(16384, 8),
    beyond={"strassen_check": (4096, 4), "tree_check": (32768, 8)}, rounds=3, max_seconds=60.0,
)
QUICK = dict(
    sizes={"tree": (256, 512, 1024), "strassen": (64, 128, 256), "triple": (32, 64, 128)},
    ds=(4, 8), tree16=(1024, 2048), naive_n=128, strassen_check=(256, 4), tree_check=(1024, 8),
    beyond={"strassen_check": (512, 4), "tree_check": (2048, 8)}, rounds=2, max_seconds=10.0,
)
#: the headline checks: (name, target, value that meets it)
TARGETS = dict(tree_rss=300.0, tree_doubling=4.6, naive=10.0, strassen_poly=100.0, tree_poly=20.0)
PARTS = ("scaling", "checks", "phase", "profile")
HEADLINE = dict(tree16=(4096, 8192), naive_n=512, strassen_check=(2048, 4), tree_check=(16384, 8))


def make_inputs(spec: str, n: int, d: int, seed: int = 0):
    q, k, v = random_inputs(spec, n, d, dtype=np.float32, seed=seed)
    t = torch.from_numpy
    return t(q), tuple(t(x) for x in k), tuple(t(x) for x in v)


def attention_call(spec: str, backend: str, q, k, v, d: int):
    return lambda: ta.attention(q, k, v, spec=spec, backend=backend, scale=1 / d, tol=TOL, return_info=True)


def reference_rows(spec: str, q, k, v, d: int, rows: int) -> torch.Tensor:
    """float64 exact output of the first ``rows`` queries (rows do not interact when non-causal)."""
    return ta.attention(q[:rows].double(), tuple(x.double() for x in k), tuple(x.double() for x in v), spec=spec,
                        backend="exact", scale=1 / d)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out[: ref.shape[0]].double() - ref).abs().max())


def loads() -> float | None:
    la = load_average()
    return la[0] if la else None


def describe_plan(info) -> dict:
    plan, cert = info.plan, info.plan.certificate
    if cert is None:
        return dict(method=None, degrees=None, ranks=None)
    degrees = list(getattr(cert, "degrees", [cert.degree]))
    ranks = list(getattr(cert, "ranks", [cert.rank]))
    return dict(method=plan.poly_method or "features", degrees=degrees, ranks=ranks, feature_dtype=cert.feature_dtype)


# ---- peak memory in a fresh process ---------------------------------------------------------------

def child(spec: str, backend: str, n: int, d: int) -> dict:
    """One call in this (fresh) process: its peak RSS growth and the whole process's peak."""
    torch.set_num_threads(1)
    q, k, v = make_inputs(spec, n, d)
    small = min(n, 64)
    ta.attention(q[:small], tuple(x[:small] for x in k), tuple(x[:small] for x in v), spec=spec, backend=backend,
                 scale=1 / d)  # imports and caches
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = ta.attention(q, k, v, spec=spec, backend=backend, scale=1 / d, tol=TOL)
        seconds = time.perf_counter() - t0
    growth = None if mem.peak_bytes is None else mem.peak_bytes / 2**20
    return dict(spec=spec, backend=backend, n=n, d=d, peak_growth_mib=growth, peak_process_mib=peak_rss_mib(),
                inputs_mib=sum(x.numel() for x in (q, *k, *v)) * 4 / 2**20, seconds=seconds,
                finite=bool(torch.isfinite(out).all()))


def child_in_fresh_process(spec: str, backend: str, n: int, d: int) -> dict:
    return in_fresh_process(__file__, "--child", spec, backend, n, d)


# ---- time against n --------------------------------------------------------------------------------

def exact_vs_poly(spec: str, n: int, d: int, cfg: dict) -> dict:
    """exact and poly timed in interleaved rounds on the same inputs, poly's error vs float64."""
    q, k, v = make_inputs(spec, n, d)
    load0 = loads()
    fns = {b: attention_call(spec, b, q, k, v, d) for b in ("exact", "poly")}
    timings, results = interleaved(fns, cfg["rounds"], warmup=1, max_seconds=cfg["max_seconds"])
    load1 = loads()
    rows = min(n, ERROR_ROWS)
    ref = reference_rows(spec, q, k, v, d, rows)
    (out_e, _), (out_p, info) = results["exact"], results["poly"]
    row = dict(spec=spec, n=n, d=d, rows=timings["exact"].repeats, error_rows=rows, load=[load0, load1],
               exact_best_s=min(timings["exact"].times), exact_median_s=timings["exact"].median,
               poly_best_s=min(timings["poly"].times), poly_median_s=timings["poly"].median,
               exact_cpu_s=timings["exact"].cpu_median, poly_cpu_s=timings["poly"].cpu_median,
               poly_error=max_err(out_p, ref), exact_error=max_err(out_e, ref), error_bound=info.error_bound,
               passed=info.passed, beta=info.beta, B=info.B, **describe_plan(info))
    row["speedup_cpu"] = row["exact_cpu_s"] / row["poly_cpu_s"]
    row["speedup_best"] = row["exact_best_s"] / row["poly_best_s"]
    row["speedup_median"] = row["exact_median_s"] / row["poly_median_s"]
    return row


def scaling(cfg: dict, log) -> list[dict]:
    out = []
    for spec, ns in cfg["sizes"].items():
        for d in cfg["ds"]:
            for n in ns:
                row = exact_vs_poly(spec, n, d, cfg)
                for backend in ("exact", "poly"):
                    mem = child_in_fresh_process(spec, backend, n, d)
                    row[f"{backend}_peak_growth_mib"] = mem["peak_growth_mib"]
                    row[f"{backend}_peak_process_mib"] = mem["peak_process_mib"]
                out.append(row)
                log(f"{spec:8s} d={d} n={n:6d}  cpu: exact {row['exact_cpu_s']:.3g} s  poly {row['poly_cpu_s']:.3g} s  "
                    f"({row['speedup_cpu']:.3g}x; wall best-of {row['speedup_best']:.3g}x)  "
                    f"err {row['poly_error']:.1e} <= {row['error_bound']:.1e}  "
                    f"mem {row['exact_peak_growth_mib']:.0f} / {row['poly_peak_growth_mib']:.0f} MiB  "
                    f"load {row['load'][1]}")
    return out


# ---- the headline checks ---------------------------------------------------------------------------

def naive_strassen(q, k, v, d: int, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Strassen attention by a naive einsum over all n^3 scores, chunked over the queries i (about
    ``chunk_bytes`` of scores per chunk), max-subtracted softmax over every (j, k)."""
    (k1, k2), (v1, v2) = k, v
    n = q.shape[0]
    s = 1 / d
    k1k2 = s * (k1 @ k2.T)
    step = max(1, chunk_bytes // (4 * n * n))
    outs = []
    for i0 in range(0, n, step):
        qi = q[i0: i0 + step]
        a, c = s * (qi @ k1.T), s * (qi @ k2.T)
        h = a[:, :, None] + k1k2[None] + c[:, None, :]  # (chunk, n, n): every score of the chunk's queries
        p = torch.softmax(h.reshape(h.shape[0], -1), -1).reshape(h.shape)
        outs.append(torch.einsum("ijk,je,ke->ie", p, v1, v2))
    return torch.cat(outs)


def checks(cfg: dict, scaled: list[dict], log) -> dict:
    res: dict = {}
    # tree exact, d = 16: peak memory at the larger n in a fresh process; time per doubling of n
    n_small, n_big = cfg["tree16"]
    mem = child_in_fresh_process("tree", "exact", n_big, 16)
    fns = {}
    for n in (n_small, n_big):
        q, k, v = make_inputs("tree", n, 16)
        fns[n] = attention_call("tree", "exact", q, k, v, 16)
    load0 = loads()
    timings, _ = interleaved(fns, cfg["rounds"], warmup=1, max_seconds=cfg["max_seconds"])
    res["tree_d16"] = dict(n=(n_small, n_big), d=16, peak_growth_mib=mem["peak_growth_mib"],
                           peak_process_mib=mem["peak_process_mib"], seconds=[min(timings[n].times) for n in fns],
                           medians=[timings[n].median for n in fns], cpu=[timings[n].cpu_median for n in fns],
                           ratio_cpu=timings[n_big].cpu_median / timings[n_small].cpu_median, load=[load0, loads()],
                           ratio_best=min(timings[n_big].times) / min(timings[n_small].times),
                           ratio_median=timings[n_big].median / timings[n_small].median)
    log(f"tree exact d=16: peak {mem['peak_process_mib']:.0f} MiB (growth {mem['peak_growth_mib']:.0f}), "
        f"t({n_big})/t({n_small}) = {res['tree_d16']['ratio_cpu']:.2f} "
        f"(wall best-of {res['tree_d16']['ratio_best']:.2f})")
    # strassen exact vs the naive einsum over n^3 scores
    res["naive"] = []
    for d in cfg["ds"]:
        n = cfg["naive_n"]
        q, k, v = make_inputs("strassen", n, d)
        fns = {"exact": attention_call("strassen", "exact", q, k, v, d),
               "naive": lambda q=q, k=k, v=v, d=d: naive_strassen(q, k, v, d)}
        load0 = loads()
        timings, results = interleaved(fns, cfg["rounds"], warmup=1, max_seconds=cfg["max_seconds"])
        ref = reference_rows("strassen", q, k, v, d, min(n, ERROR_ROWS))
        res["naive"].append(dict(
            n=n, d=d, exact_best_s=min(timings["exact"].times), naive_best_s=min(timings["naive"].times),
            exact_median_s=timings["exact"].median, naive_median_s=timings["naive"].median, load=[load0, loads()],
            exact_cpu_s=timings["exact"].cpu_median, naive_cpu_s=timings["naive"].cpu_median,
            ratio_cpu=timings["naive"].cpu_median / timings["exact"].cpu_median,
            ratio_best=min(timings["naive"].times) / min(timings["exact"].times),
            ratio_median=timings["naive"].median / timings["exact"].median,
            exact_error=max_err(results["exact"][0], ref), naive_error=max_err(results["naive"], ref)))
        log(f"strassen exact vs naive, n={n} d={d}: {res['naive'][-1]['ratio_cpu']:.1f}x")
    # poly vs exact at the headline sizes (from the scaling run when it measured them)
    for key, spec in (("strassen_check", "strassen"), ("tree_check", "tree")):
        n, d = cfg[key]
        row = next((r for r in scaled if (r["spec"], r["n"], r["d"]) == (spec, n, d)), None)
        res[key] = row if row is not None else exact_vs_poly(spec, n, d, cfg)
        # a larger n, to see where the target's ratio is reached
        res[key + "_beyond"] = exact_vs_poly(spec, *cfg["beyond"][key], cfg)
        for r in (res[key], res[key + "_beyond"]):
            log(f"{spec} poly vs exact n={r['n']} d={d}: {r['speedup_cpu']:.1f}x, err {r['poly_error']:.1e} "
                f"<= {r['error_bound']:.1e}")
    return res


def check_table(res: dict) -> list[dict]:
    """The 'done when' rows: what was measured, against which target; judged at the headline sizes
    only, by the ratio of median processor times (the wall-clock ratios are shown alongside)."""
    rows = []
    t = res["tree_d16"]
    at = tuple(t["n"]) == HEADLINE["tree16"]
    rows.append(dict(check=f"`tree` exact, n = {t['n'][1]:,}, d = 16, float32: peak RSS of the whole process",
                     target=f"≤ {TARGETS['tree_rss']:.0f} MiB",
                     measured=f"{t['peak_process_mib']:.0f} MiB ({t['peak_growth_mib']:.0f} MiB above the RSS at "
                              "the call's start)",
                     met=t["peak_process_mib"] <= TARGETS["tree_rss"] if at else None))
    rows.append(dict(check=f"`tree` exact, d = 16: time({t['n'][1]:,}) / time({t['n'][0]:,})",
                     target=f"≤ {TARGETS['tree_doubling']}",
                     measured=f"{t['ratio_cpu']:.2f} ({_t(t['cpu'][0])} → {_t(t['cpu'][1])} processor time; wall: "
                              f"best-of {t['ratio_best']:.2f}, medians {t['ratio_median']:.2f})",
                     met=t["ratio_cpu"] <= TARGETS["tree_doubling"] if at else None))
    for r in res["naive"]:
        rows.append(dict(check=f"`strassen` exact vs a naive einsum over the n³ scores (chunked over i), "
                               f"n = {r['n']:,}, d = {r['d']}",
                         target=f"≥ {TARGETS['naive']:.0f}× faster",
                         measured=f"{r['ratio_cpu']:.1f}× (naive {_t(r['naive_cpu_s'])}, exact "
                                  f"{_t(r['exact_cpu_s'])}; wall: best-of {r['ratio_best']:.1f}×, medians "
                                  f"{r['ratio_median']:.1f}×); outputs "
                                  f"agree to {max(r['exact_error'], r['naive_error']):.0e} of float64",
                         met=r["ratio_cpu"] >= TARGETS["naive"] if r["n"] == HEADLINE["naive_n"] else None))
    for key, spec, goal in (("strassen_check", "strassen", TARGETS["strassen_poly"]),
                            ("tree_check", "tree", TARGETS["tree_poly"])):
        for r in (res[key], res.get(key + "_beyond")):
            if r is None:
                continue
            within = r["poly_error"] <= r["error_bound"]
            at = (r["n"], r["d"]) == HEADLINE[key]
            beyond = r is res.get(key + "_beyond")
            rows.append(dict(
                check=f"`{spec}` poly vs `{spec}` exact, n = {r['n']:,}, d = {r['d']}, entries U[−1, 1], `scale=1/d`"
                      + (" (a larger n, reported)" if beyond else ""),
                target=f"≥ {goal:.0f}× faster, error ≤ `info.error_bound`",
                measured=f"{r['speedup_cpu']:.3g}× (exact {_t(r['exact_cpu_s'])}, poly {_t(r['poly_cpu_s'])}; wall: "
                         f"best-of {r['speedup_best']:.3g}×, medians {r['speedup_median']:.3g}×); error "
                         f"{r['poly_error']:.1e} "
                         f"{'≤' if within else '>'} {r['error_bound']:.1e}",
                met=(r["speedup_cpu"] >= goal and within) if at and not beyond else None))
    return rows


# ---- the phase transition per structure ------------------------------------------------------------

def phase(out: Path, quick: bool) -> dict:
    ns = (2**10, 2**16) if quick else (2**10, 2**16, 2**20)
    res = {}
    for spec in ("pairwise", "triple", "strassen", "tree"):
        plans = term_phase_plans(spec, ns, 12 if quick else 48, d=8, tol=TOL)
        plans["caption"] = term_phase(plans, out / f"phase_{spec}.png")
        res[spec] = plans
    return res


# ---- where poly's time goes ---------------------------------------------------------------------------

def profiles(cfg: dict, log) -> list[dict]:
    """One poly call at each headline size under torch.profiler (one thread): the time in the
    feature maps (aten::mul), in GEMMs, and outside torch ops."""
    out = []
    for key, spec in (("strassen_check", "strassen"), ("tree_check", "tree")):
        n, d = cfg[key]
        prof = profile_poly(spec, n, d, TOL)
        out.append(prof)
        log(f"profile {spec} n={n} d={d}: wall {prof['wall_s'] * 1e3:.0f} ms, features (mul) "
            f"{prof['mul_s'] * 1e3:.0f} ms, GEMMs {prof['gemm_s'] * 1e3:.0f} ms")
    return out


# ---- plots and the README section ------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(rows: list[dict], out: Path) -> None:
    plt = _plt()
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    for what, fname, ylabel in (("cpu_s", "time_vs_n.png", "median processor time per call (s)"),
                                ("peak_growth_mib", "memory_vs_n.png", "peak RSS growth of the call (MiB)")):
        fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 4.2), squeeze=False)
        for ax, spec in zip(axes[0], specs):
            for j, d in enumerate(sorted({r["d"] for r in rows if r["spec"] == spec})):
                pts = sorted((r["n"], r) for r in rows if r["spec"] == spec and r["d"] == d)
                for backend, color in (("exact", "C1"), ("poly", "C0")):
                    ys = [r[f"{backend}_{what}"] for _, r in pts]
                    ax.plot([n for n, _ in pts], [max(y, 1e-3) if y is not None else np.nan for y in ys],
                            "-o" if j == 0 else "--s", color=color, label=f"{backend}, d = {d}", ms=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (queries = keys per slot)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{spec}: float32, U[-1, 1], scale 1/d, tol 1e-3, 1 thread", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)


def _mib(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _t(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def section(res: dict, out: Path) -> str:
    env = res["environment"]
    rel = out.relative_to(HERE) if out.is_relative_to(HERE) else out
    la = [x for x in res["loads"] if x is not None]
    lines = [
        f"Command: `{res['command']}`  ",
        *(f"then `{u['command']}` ({u['date']}; {u.get('wall_s', 0) / 60:.0f} min, commit "
          f"{u['environment']['commit']})  " for u in res.get("updates", [])),
        f"Date: {res['date']}; wall time {res['wall_s'] / 60:.0f} min; commit {env['commit']}; torch {env['torch']}, "
        f"{env['cpu']}, {env['cores']} cores, **1 torch thread**.  ",
        f"Machine load: the 1-minute load average ranged {min(la):.1f}–{max(la):.1f} on {env['cores']} cores during "
        "the run (other jobs shared the machine). Each ratio compares calls timed in interleaved rounds in this one "
        "run, by their median processor time (the thread's CPU time, close to the time alone on one core); the "
        "wall-clock ratios, stretched by the load, are given beside.\n" if la else "\n",
    ]
    if res.get("checks_table"):
        lines += ["| check | target | measured | met |", "|---|---|---|---|"]
        for c in res["checks_table"]:
            met = "" if c["met"] is None else ("yes" if c["met"] else "**no**")
            lines.append(f"| {c['check']} | {c['target']} | {c['measured']} | {met} |")
        lines.append("")
    if res.get("scaling"):
        lines += ["Time, memory and error against n (float32, entries U[−1, 1], `scale = 1/d`, `tol = 1e-3`; "
                  "times: median processor time per call on one thread, with the wall-clock best-of beside; peak "
                  "memory: growth above the RSS at the call's start, each case in a fresh process):\n",
                  "| spec | d | n | exact | poly | exact / poly | wall: exact, poly (best-of) | poly error ≤ bound "
                  "| poly method, degrees / ranks | exact peak (MiB) | poly peak (MiB) |",
                  "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|"]
        for r in res["scaling"]:
            degs = "/".join(map(str, sorted(set(r["degrees"])))) if r["degrees"] else "–"
            ranks = "/".join(f"{x:,}" for x in sorted(set(r["ranks"]))) if r["ranks"] else "–"
            lines.append(
                f"| {r['spec']} | {r['d']} | {r['n']:,} | {_t(r['exact_cpu_s'])} | {_t(r['poly_cpu_s'])} | "
                f"{r['speedup_cpu']:.3g}× | {_t(r['exact_best_s'])}, {_t(r['poly_best_s'])} "
                f"({r['speedup_best']:.3g}×) | {r['poly_error']:.1e} ≤ "
                f"{r['error_bound']:.1e} | {r['method']}, {degs} / {ranks} | {_mib(r['exact_peak_growth_mib'])} | "
                f"{_mib(r['poly_peak_growth_mib'])} |")
        lines += ["", f"![time against n]({rel}/time_vs_n.png)\n", f"![memory against n]({rel}/memory_vs_n.png)\n"]
    if res.get("profiles"):
        lines += ["Where a poly call spends its time (torch.profiler, one thread, self CPU time per op):\n"]
        for p in res["profiles"]:
            ops = ", ".join(f"{o['op']} {o['seconds'] * 1e3:.1f} ms ({o['calls']})" for o in p["top_ops"][:5])
            lines.append(f"- `{p['spec']}`, n = {p['n']:,}, d = {p['d']} (degree {p['degree']}, rank {p['rank']:,}): "
                         f"{p['wall_s'] * 1e3:.0f} ms profiled ({p['unprofiled_s'] * 1e3:.0f} ms without the "
                         f"profiler); building the feature maps (aten::mul) {p['mul_s'] * 1e3:.0f} ms, GEMMs "
                         f"{p['gemm_s'] * 1e3:.0f} ms ({p['gemm_calls']} calls), outside torch ops "
                         f"{p['outside_ops_s'] * 1e3:.0f} ms. Top ops: {ops}.")
        lines.append("")
    for spec, plans in res.get("phase", {}).items():
        lines += [f"![phase transition, {spec}]({rel}/phase_{spec}.png)\n", f"*{plans['caption']}*\n"]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    from tensorattn.bench.report import _cpu_model, _git_commit

    return dict(commit=_git_commit(), torch=torch.__version__, python=platform.python_version(), cpu=_cpu_model(),
                cores=os.cpu_count(), threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test; targets are judged only at "
                                                         "the headline sizes)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--update", action="store_true",
                    help="keep the other parts of --out's results.json and replace only these")
    ap.add_argument("--out", type=Path, default=HERE / "latest_poly")
    ap.add_argument("--from-results", action="store_true", help="rewrite section.md from --out's results.json")
    ap.add_argument("--child", nargs=4, metavar=("SPEC", "BACKEND", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec, backend, n, d = args.child
        print(json.dumps(child(spec, backend, int(n), int(d))))
        return
    if args.from_results:
        out = args.out.resolve()
        (out / "section.md").write_text(section(json.loads((out / "results.json").read_text()), out))
        return
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seen_loads = [loads()]

    def log(msg: str) -> None:
        seen_loads.append(loads())
        print(msg, flush=True)

    flag = " --quick" if args.quick else ""
    parts = "" if args.parts == list(PARTS) else " --parts " + " ".join(args.parts)
    rel = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    run = dict(command=f"python benchmarks/poly_attention.py{flag}{parts}{' --update' if args.update else ''} "
                       f"--out {rel}", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), environment=environment())
    previous = out / "results.json"
    if args.update and previous.exists():
        res = json.loads(previous.read_text())
        res.setdefault("updates", []).append(run)
        seen_loads = res.get("loads", []) + seen_loads
    else:
        res = dict(run, quick=args.quick)
    if "scaling" in args.parts:
        res["scaling"] = scaling(cfg, log)
        plot_scaling(res["scaling"], out)
    if "checks" in args.parts:
        res["checks"] = checks(cfg, res.get("scaling", []), log)
        res["checks_table"] = check_table(res["checks"])
    if "phase" in args.parts:
        res["phase"] = phase(out, args.quick)
    if "profile" in args.parts:
        res["profiles"] = profiles(cfg, log)
    seen_loads.append(loads())
    res["loads"] = seen_loads
    if args.update and "updates" in res:
        res["updates"][-1]["wall_s"] = time.perf_counter() - start
    else:
        res["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "section.md").write_text(section(res, out))
    for c in res.get("checks_table", []):
        print(f"{c['check']}: {c['measured']} (target {c['target']}; met: {c['met']})")
    print(f"wrote {out / 'section.md'}")


if __name__ == "__main__":
    main()
