"""Side by side with the peer packages strassen-attention and poly-attention: time, memory, agreement, overflow.

Run (the peers are the optional extra ``peers``; pip install -e ".[peers]"):

    python benchmarks/peers.py [--quick] [--out DIR]

Equal work: the same n, d and value size e, the same inputs (float32, entries U[-1, 1]) and the same
function. The peers' definitions are mapped onto ours (tests/test_peers.py checks the mapping in
float64):

* ``strassen_attention.strassen_attend`` scales only q by sigma = d^-1/2; with a = sqrt(s) it gets
  q a / sigma, k1 a, k2 a and computes our ``strassen`` at scale s (values v1_j * v2_k in both).
* ``poly_attention.poly_attention.reference_poly_attention(q1, q2, q2, q3, v3)`` is the tree
  i-j-k with a value on the leaf only: our ``tree`` with v1 = 1, after q1 = q s / sigma,
  q3 = k2 s / sigma.

Every call runs on one thread; ours (exact, poly) and theirs are timed in interleaved rounds and
compared by their median processor time (the thread's CPU time, which a shared machine's load
stretches far less than the wall time; the wall best-of times are recorded too). Peak memory: each call once in a fresh
subprocess (growth of the resident set above its start). Agreement: max |ours - theirs| on the
float32 outputs of the timed calls, and both against our float64 exact on the first query rows.
Overflow: inputs with large scores, where strassen_attend's unshifted exp overflows float32.
Writes results.json and section.md (inserted into benchmarks/README.md by publish.py) to --out
(default benchmarks/latest_peers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tensorattn as ta
from tensorattn.bench.measure import PeakMemory, in_fresh_process, interleaved, load_average

HERE = Path(__file__).resolve().parent
# this folder's poly_attention.py would shadow the peer package of the same name
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
TOL = 1e-3
ERROR_ROWS = 128

FULL = dict(sizes={"strassen": (128, 256, 512, 1024, 2048), "tree": (1024, 2048, 4096, 8192)}, d=8, rounds=3,
            max_seconds=60.0)
QUICK = dict(sizes={"strassen": (64, 128), "tree": (256, 512)}, d=8, rounds=2, max_seconds=10.0)


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("strassen-attention", "poly-attention"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def make_inputs(n: int, d: int, e: int, bound: float = 1.0, seed: int = 0):
    """(1, 1, n, d) queries and keys U[-bound, bound]; values U[-1, 1] of size e."""
    rng = np.random.default_rng(seed)

    def draw(width, b):
        return torch.from_numpy(rng.uniform(-b, b, (1, 1, n, width)).astype(np.float32))

    return draw(d, bound), (draw(d, bound), draw(d, bound)), (draw(e, 1.0), draw(e, 1.0))


def calls(spec: str, q, k, v, scale: float) -> dict:
    """The three equal-work calls: ours exact, ours poly, theirs (inputs mapped outside the timer)."""
    d = q.shape[-1]
    sigma = d**-0.5
    if spec == "strassen":
        from strassen_attention import strassen_attend

        a = math.sqrt(scale)
        pq, pk1, pk2 = q * (a / sigma), k[0] * a, k[1] * a
        theirs = lambda: strassen_attend(pq, pk1, pk2, v[0], v[1])  # noqa: E731
        values = v
    else:
        from poly_attention.poly_attention import reference_poly_attention

        c = scale / sigma
        pq, pk2 = q * c, k[1] * c
        theirs = lambda: reference_poly_attention(pq, k[0], k[0], pk2, v[1])[0]  # noqa: E731
        values = (torch.ones_like(v[0]), v[1])  # the peer has no value on the middle slot
    ours = {b: (lambda b=b: ta.attention(q, k, values, spec=spec, backend=b, scale=scale, tol=TOL, return_info=True))
            for b in ("exact", "poly")}
    return dict(exact=ours["exact"], poly=ours["poly"], theirs=theirs, values=values)


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def child(spec: str, impl: str, n: int, d: int) -> dict:
    torch.set_num_threads(1)
    q, k, v = make_inputs(n, d, d)
    small = make_inputs(32, d, d)
    calls(spec, *small, 1 / d)[impl]()  # imports and caches
    fn = calls(spec, q, k, v, 1 / d)[impl]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = _out(fn())
        seconds = time.perf_counter() - t0
    return dict(peak_growth_mib=None if mem.peak_bytes is None else mem.peak_bytes / 2**20, seconds=seconds,
                finite=bool(torch.isfinite(out).all()))


def child_in_fresh_process(spec: str, impl: str, n: int, d: int) -> dict:
    return in_fresh_process(__file__, "--child", spec, impl, n, d)


def reference_rows(spec: str, q, k, values, scale: float, rows: int) -> torch.Tensor:
    return ta.attention(q[..., :rows, :].double(), tuple(x.double() for x in k), tuple(x.double() for x in values),
                        spec=spec, backend="exact", scale=scale)


def side_by_side(spec: str, n: int, cfg: dict) -> dict:
    d = cfg["d"]
    scale = 1 / d
    q, k, v = make_inputs(n, d, d)
    fns = calls(spec, q, k, v, scale)
    values = fns.pop("values")
    load0 = load_average()
    timings, results = interleaved(fns, cfg["rounds"], warmup=1, max_seconds=cfg["max_seconds"])
    load1 = load_average()
    out_e, out_p, out_t = _out(results["exact"]), results["poly"][0], _out(results["theirs"])
    info = results["poly"][1]
    rows = min(n, ERROR_ROWS)
    ref = reference_rows(spec, q, k, values, scale, rows)

    def err(x):
        return float((x[..., :rows, :].double() - ref).abs().max())

    row = dict(spec=spec, n=n, d=d, e=d, load=[load0 and load0[0], load1 and load1[0]],
               agreement_exact_theirs=float((out_e - out_t).abs().max()),
               error_exact=err(out_e), error_poly=err(out_p), error_theirs=err(out_t), poly_bound=info.error_bound,
               poly_method=info.plan.poly_method, poly_degree=info.degree, poly_rank=info.rank,
               theirs_finite=bool(torch.isfinite(out_t).all()))
    for name, t in timings.items():
        row[f"{name}_best_s"] = min(t.times)
        row[f"{name}_median_s"] = t.median
        row[f"{name}_cpu_s"] = t.cpu_median
    for impl in ("exact", "poly", "theirs"):
        row[f"{impl}_peak_mib"] = child_in_fresh_process(spec, impl, n, d)["peak_growth_mib"]
    return row


def overflow() -> list[dict]:
    """Large scores in float32: strassen_attend exponentiates each factor unshifted."""
    from strassen_attention import strassen_attend

    rows = []
    n, d = 16, 8
    for label, bound, scale in (("<k1,k2> up to 128 (keys all 4, scale 1)", None, 1.0),
                                ("entries U[-3, 3], scale d^-1/2", 3.0, d**-0.5),
                                ("entries U[-8, 8], scale d^-1/2", 8.0, d**-0.5)):
        if bound is None:
            q, k, v = make_inputs(n, d, d, seed=1)
            k = (torch.full_like(k[0], 4.0), torch.full_like(k[1], 4.0))
        else:
            q, k, v = make_inputs(n, d, d, bound=bound, seed=1)
        a, sigma = math.sqrt(scale), d**-0.5
        theirs = strassen_attend(q * (a / sigma), k[0] * a, k[1] * a, v[0], v[1])
        ours = ta.attention(q, k, v, spec="strassen", scale=scale, backend="exact")
        ref = ta.attention(q.double(), tuple(x.double() for x in k), tuple(x.double() for x in v), spec="strassen",
                           scale=scale, backend="exact")
        h = scale * (q.double() @ k[0].double().transpose(-1, -2))[..., :, :, None] + scale * (
            k[0].double() @ k[1].double().transpose(-1, -2))[..., None, :, :] + scale * (
            q.double() @ k[1].double().transpose(-1, -2))[..., :, None, :]
        finite_t = torch.isfinite(theirs)
        rows.append(dict(case=label, n=n, d=d, max_score=float(h.abs().max()),
                         theirs_nan=int((~finite_t).sum()), outputs=theirs.numel(),
                         theirs_error=float((theirs.double() - ref)[finite_t].abs().max()) if finite_t.any() else None,
                         ours_finite=bool(torch.isfinite(ours).all()),
                         ours_error=float((ours.double() - ref).abs().max())))
    return rows


def _t(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def section(res: dict) -> str:
    env = res["environment"]
    la = [x for r in res["rows"] for x in r["load"] if x is not None]
    lines = [
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}; wall time {res['wall_s'] / 60:.0f} min; commit {env['commit']}; torch {env['torch']}; "
        f"strassen-attention {env['peers']['strassen-attention']}, poly-attention {env['peers']['poly-attention']}; "
        f"{env['cpu']}, {env['cores']} cores, **1 torch thread**.  ",
        (f"Machine load: the 1-minute load average ranged {min(la):.1f}–{max(la):.1f} on {env['cores']} cores (other "
         "jobs shared the machine). Times are median processor times per call on one thread, from interleaved "
         "rounds; the ratios in parentheses are of the wall-clock best-of times.\n") if la else "\n",
        "| function | n | ours exact | ours poly | theirs | theirs / ours exact | theirs / ours poly | "
        "peak MiB: exact / poly / theirs | max abs diff ours exact vs theirs | errors vs float64: exact / poly "
        "(bound) / theirs |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    names = {"strassen": "Strassen (`strassen_attend`)", "tree": "tree, v1 = 1 (`reference_poly_attention`)"}
    for r in res["rows"]:
        lines.append(
            f"| {names[r['spec']]} | {r['n']:,} | {_t(r['exact_cpu_s'])} | {_t(r['poly_cpu_s'])} | "
            f"{_t(r['theirs_cpu_s'])} | {r['theirs_cpu_s'] / r['exact_cpu_s']:.3g}× "
            f"({r['theirs_best_s'] / r['exact_best_s']:.3g}×) | {r['theirs_cpu_s'] / r['poly_cpu_s']:.3g}× "
            f"({r['theirs_best_s'] / r['poly_best_s']:.3g}×) | {_mib(r['exact_peak_mib'])} / "
            f"{_mib(r['poly_peak_mib'])} / {_mib(r['theirs_peak_mib'])} | {r['agreement_exact_theirs']:.1e} | "
            f"{r['error_exact']:.1e} / {r['error_poly']:.1e} ({r['poly_bound']:.1e}) / {r['error_theirs']:.1e} |")
    if res.get("overflow"):
        lines += ["", "Large scores, float32, n = 16, d = 8 (errors against our float64 exact):\n",
                  "| inputs | max abs score | strassen_attend: NaN outputs | its error elsewhere "
                  "| ours: finite, error |",
                  "|---|---:|---:|---:|---|"]
        for r in res["overflow"]:
            te = "–" if r["theirs_error"] is None else f"{r['theirs_error']:.1e}"
            lines.append(f"| {r['case']} | {r['max_score']:.0f} | {r['theirs_nan']} of {r['outputs']} | {te} | "
                         f"{'yes' if r['ours_finite'] else 'no'}, {r['ours_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--out", type=Path, default=HERE / "latest_peers")
    ap.add_argument("--from-results", action="store_true", help="rewrite section.md from --out's results.json")
    ap.add_argument("--child", nargs=4, metavar=("SPEC", "IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec, impl, n, d = args.child
        print(json.dumps(child(spec, impl, int(n), int(d))))
        return
    if args.from_results:
        (args.out / "section.md").write_text(section(json.loads((args.out / "results.json").read_text())))
        return
    missing = [name for name, ver in peer_versions().items() if ver is None]
    if missing:
        sys.exit(f"the peer packages {missing} are not installed; pip install -e '.[peers]'")
    torch.set_num_threads(1)
    from tensorattn.bench.report import _cpu_model, _git_commit

    cfg = QUICK if args.quick else FULL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rel = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    res = dict(command=f"python benchmarks/peers.py{' --quick' if args.quick else ''} --out {rel}",
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               environment=dict(commit=_git_commit(), torch=torch.__version__, python=platform.python_version(),
                                cpu=_cpu_model(), cores=os.cpu_count(), threads=1, peers=peer_versions()),
               rows=[])
    for spec, ns in cfg["sizes"].items():
        for n in ns:
            row = side_by_side(spec, n, cfg)
            res["rows"].append(row)
            print(f"{spec:8s} n={n:6d}  cpu: exact {_t(row['exact_cpu_s'])}  poly {_t(row['poly_cpu_s'])}  theirs "
                  f"{_t(row['theirs_cpu_s'])}  |ours-theirs| {row['agreement_exact_theirs']:.1e}  peak MiB "
                  f"{_mib(row['exact_peak_mib'])}/{_mib(row['poly_peak_mib'])}/{_mib(row['theirs_peak_mib'])}",
                  flush=True)
    res["overflow"] = overflow()
    res["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "section.md").write_text(section(res))
    print(section(res))


if __name__ == "__main__":
    main()
