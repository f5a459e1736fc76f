"""The benchmark suite behind ``tensorattn bench``: every spec and backend against each other and
against the baselines (torch SDPA, FAVOR+, degree-2 Taylor), with tables, plots and the
phase-transition experiments. ``run_bench`` writes results.json, results.csv, report.md and PNG
plots to one directory and returns the results as a dict.

>>> from tensorattn.bench import SUITES, get_suite
>>> sorted(SUITES)
['default', 'full', 'micro']
>>> len(get_suite("micro").cases)
13
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import experiments, plots
from .measure import PeakMemory, harness_overhead, load_average, single_thread
from .report import environment, markdown, targets, write_csv, write_json
from .runner import run_sweep
from .suites import PARTS, SUITES, SWEEP_BACKENDS, Case, Suite, get_suite, override

__all__ = [
    "PARTS", "SUITES", "SWEEP_BACKENDS", "Case", "Suite", "environment", "get_suite", "override", "replot", "run_bench",
]


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        return None
    return lambda it, **kw: tqdm(it, leave=False, dynamic_ncols=True, **kw)


def _method(suite: Suite) -> list[str]:
    return [
        f"Timing: each case makes {suite.warmup} untimed warm-up call(s), then timed calls: at least "
        f"{suite.min_repeats}, then until the spread (median − fastest) / fastest is at most "
        f"{100 * suite.max_spread:.0f}%, at most {suite.repeats}, fewer once the timed calls pass "
        f"{suite.max_case_seconds:g} s; the median is reported. The timer brackets one `ta.attention` call on "
        "inputs already built as float32 torch tensors (batch 1); the call includes validation and planning, "
        "as a user sees it.",
        f"Load from outside the process: the CPU time other processes used during each case's timed calls "
        f"(/proc/stat minus this process's own CPU time) is recorded as a share of all cores. Cases timed "
        f"while it exceeded {100 * suite.load_limit:.0f}%, cases with a larger spread, and cases faster than "
        f"the same backend at a smaller n are timed again after the sweep (within {suite.rerun_seconds:g} s); "
        "the steadier measurement is kept, and what stays unsteady or non-monotone is flagged.",
        "Every ratio is computed from medians measured in this run.",
        f"Estimated cases (`~`, `estimated` in results): exact and sdpa visit n·m^(k-1) key tuples; past "
        f"{suite.quadratic_work_cap:.3g} tuples they run on two blocks of query rows (r/4 and r rows, r·m^(k-1) "
        f"≈ {suite.estimate_work:.3g}; the "
        "last rows when causal, which see the most keys), and the time is extrapolated as t = a + b·W in "
        "the number W of visited key tuples (their cost is linear in query rows), fitted through the two "
        "medians; when noise makes that fit degenerate, by proportional scaling of the larger block, which "
        "can only overstate the time (the row's note says which).",
        f"Peak memory per case: {PeakMemory.method}, over warm-up and timed calls, after returning freed "
        "heap memory to the OS (malloc_trim). The exact peak-RSS target runs in a fresh process "
        "(its own VmHWM, the whole process: interpreter, torch, inputs and the call).",
        f"Error: max |out − exact| against the exact backend in float64, over a block of query rows "
        f"visiting at most {suite.error_work_cap:.3g} key tuples (`error_rows` in results).",
        "The machine may be shared: the load average at the start and end of the run is recorded above; "
        "the medians and ratios are from one run.",
    ]


def run_bench(suite: str | Suite = "default", out: str | os.PathLike = "bench-results", *, progress: bool = True,
              plots_enabled: bool = True, command: str | None = None, **overrides: Any) -> dict:
    """Run a suite and write results.json, results.csv, report.md and the PNG plots to ``out``.

    ``overrides`` (spec, backend, n, d, B, tol, causal: sequences; parts: which parts run) replace
    the suite's sweep; see ``tensorattn.bench.override``.
    """
    s = suite if isinstance(suite, Suite) else get_suite(suite)
    s = override(s, **overrides)
    if plots_enabled and importlib.util.find_spec("matplotlib") is None:  # say so before the run, not after
        raise InputError("the benchmark plots need matplotlib, which is not installed. Fix: pip install "
                         "'tensorattn[bench]' (or the [test] extra), or pass --no-plots (plots_enabled=False)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env = environment()
    bar = _progress_bar(progress)
    seconds: dict[str, float] = {}

    def part(name, fn):
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - t0
        return result

    rows = part("sweep", lambda: run_sweep(s, bar)) if "sweep" in s.parts else []
    exps: dict[str, Any] = {}
    jobs = {  # the untimed experiments run single-threaded (see measure.single_thread)
        "poly": lambda: dict(rows=run_sweep(s, bar, cases=s.poly_cases, estimate=False, desc="poly-attention")),
        "rank": lambda: _untimed(experiments.rank_experiment, s, bar),
        "phase": lambda: experiments.phase_plans(s),
        "fixed": lambda: _untimed(experiments.fixed_degree_experiment, s, bar),
        "needle": lambda: _untimed(experiments.needle_experiment, s, bar),
        "grad": lambda: experiments.grad_experiment(s, bar),
        "gemm": lambda: experiments.gemm_share(s),
        "rss": lambda: experiments.exact_peak_rss(s),
    }
    for name, job in jobs.items():
        if name in s.parts:
            exps[name] = part(name, job)
    timed = [r["median_s"] for r in rows if r["status"] == "ok" and not r["estimated"]]
    if timed:
        per_call = harness_overhead()
        exps["harness"] = dict(per_call_s=per_call, smallest_median_s=min(timed), share=per_call / min(timed))
    figures: dict[str, str] = {}
    if plots_enabled:
        figures = part("plots", lambda: _plots(rows, exps, out))
    env["load_average_end"] = load_average()
    results = dict(
        command=command or f"run_bench({s.name!r})", date=date, wall_s=time.perf_counter() - start,
        suite=dict(name=s.name, parts=list(s.parts), warmup=s.warmup, repeats=s.repeats, max_spread=s.max_spread,
                   load_limit=s.load_limit, rerun_seconds=s.rerun_seconds,
                   min_repeats=s.min_repeats, max_case_seconds=s.max_case_seconds,
                   quadratic_work_cap=s.quadratic_work_cap, estimate_work=s.estimate_work,
                   error_work_cap=s.error_work_cap),
        part_seconds=seconds, environment=env, method=_method(s), rows=rows, experiments=exps,
        targets=targets(rows, exps, s) if "targets" in s.parts else [], figures=figures,
    )
    write_json(results, out / "results.json")
    write_csv(rows, out / "results.csv")
    (out / "report.md").write_text(markdown(results))
    return results


def _untimed(fn, *args):
    with single_thread():
        return fn(*args)


def replot(results: dict, out: str | os.PathLike) -> dict[str, str]:
    """Redraw the PNG plots of a finished run (e.g. loaded from results.json) into ``out``."""
    return _plots(results["rows"], results["experiments"], Path(out))


def _plots(rows: list[dict], exps: dict, out: Path) -> dict[str, str]:
    figures = {}
    jobs = [
        ("time_vs_n.png", lambda p: plots.time_vs_n(rows, p)),
        ("poly_attention.png", lambda p: plots.poly_time_vs_n(exps["poly"]["rows"], p) if "poly" in exps else None),
        ("error_vs_rank.png", lambda p: plots.error_vs_rank(exps["rank"], p) if "rank" in exps else None),
        ("phase_transition.png", lambda p: plots.phase_transition(exps["phase"], p) if "phase" in exps else None),
        ("fixed_degree_error.png", lambda p: plots.fixed_degree(exps["fixed"], p) if "fixed" in exps else None),
        ("needle.png", lambda p: plots.needle(exps["needle"], p) if "needle" in exps else None),
    ]
    for name, job in jobs:
        caption = job(out / name)
        if caption:
            figures[name] = caption
    return figures
