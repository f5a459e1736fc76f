"""The benchmark harness: a micro suite writes every artifact; the pieces (estimates, crossover,
overrides, forced-degree poly) behave. Never asserts timings."""

import csv
import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest

import tensorattn as ta
from tensorattn.bench import get_suite, override, run_bench
from tensorattn.bench.experiments import fixed_degree_experiment, poly_at_degree, term_phase_plans
from tensorattn.bench.measure import AffineEstimate, PeakMemory, interleaved, measure, visible_tuples
from tensorattn.bench.plots import crossover, fixed_degree, term_phase
from tensorattn.bench.report import CSV_FIELDS
from tensorattn.testing import random_inputs, reference_attention


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench("micro", out, progress=False)


def test_micro_suite_writes_every_artifact(micro):
    out, results = micro
    for name in ("results.json", "results.csv", "report.md", "time_vs_n.png", "error_vs_rank.png",
                 "phase_transition.png", "fixed_degree_error.png", "needle.png"):
        assert (out / name).stat().st_size > 0, name
    loaded = json.loads((out / "results.json").read_text())
    assert len(loaded["rows"]) == len(get_suite("micro").cases)
    assert loaded["environment"]["torch_threads"] >= 1 and loaded["environment"]["torch"]
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == len(loaded["rows"])
    report = (out / "report.md").read_text()
    assert "## Performance targets" in report and "![needle.png](needle.png)" in report
    assert "n/a: favor" in report  # favor cannot serve triple
    assert set(results["figures"]) == {"time_vs_n.png", "poly_attention.png", "error_vs_rank.png",
                                       "phase_transition.png", "fixed_degree_error.png", "needle.png"}
    assert "## Attention polynomials" in report and "#### strassen, d = 4" in report


def test_micro_rows_are_consistent(micro):
    _, results = micro
    rows = results["rows"]
    statuses = {(r["spec"], r["backend"]): r["status"] for r in rows}
    assert statuses[("triple", "favor")] == "n/a"
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["repeats"] >= 1 and r["median_s"] > 0 and r["error_rows"] > 0
        if r["backend"] == "poly":
            assert r["max_error"] <= r["error_bound"], r
            assert r["rank"] == math.comb(r["d"] + r["degree"], r["degree"])
        if r["backend"] in ("exact", "sdpa"):
            assert r["max_error"] < 1e-5
        if r["backend"] == "favor":  # compared at the rank poly certifies on the same inputs
            poly = next(p for p in rows if p["backend"] == "poly" and p["spec"] == r["spec"] and p["n"] == r["n"])
            assert r["rank"] == poly["rank"]
    assert any(r["estimated"] for r in rows), "the micro suite exercises the row-fraction estimate"
    assert any(t["workload"].startswith("triple") for t in results["targets"])


def test_micro_experiments(micro):
    _, results = micro
    exps = results["experiments"]
    for p in exps["rank"]["points"]:
        if p["method"] == "poly":
            assert p["max_error"] <= p["error_bound"]
    for k in ("2", "3"):
        pts = exps["phase"][k]["sizes"][0]["points"]
        degrees = [p["degree"] for p in pts if p["degree"] is not None]
        assert degrees == sorted(degrees), "degree needed is monotone in B"
        for p in exps["fixed"][k]["points"]:
            assert p["max_error"] <= p["error_bound"] * (1 + 1e-9)
    weights = [p["mean_weight"] for p in exps["needle"]["sizes"][0]["points"]]
    assert weights[-1] > weights[0] and all(0 <= w <= 1 for w in weights)
    assert {r["backend"] for r in exps["grad"]["rows"]} == {"poly", "exact", "sdpa", "favor", "taylor2"}
    for r in exps["grad"]["rows"]:
        assert math.isfinite(r["max_grad_error"])
        if r["backend"] == "poly":  # certified: the measured error is within the bound
            assert r["max_grad_error"] <= r["grad_error_bound"], r
    poly_rows = exps["poly"]["rows"]
    assert {(r["spec"], r["backend"]) for r in poly_rows} == {(s, b) for s in ("strassen", "tree")
                                                              for b in ("poly", "exact")}
    for r in poly_rows:
        assert r["status"] == "ok" and not r["estimated"] and r["error_rows"] > 0, r
        if r["backend"] == "poly":
            assert r["max_error"] <= r["error_bound"], r
        else:
            assert r["max_error"] < 1e-5
    poly_targets = [t for t in results["targets"] if t["workload"].startswith(("strassen", "tree"))]
    assert len(poly_targets) == 2 and all(t["met"] is None for t in poly_targets)  # micro sizes: reported only
    gemm = exps["gemm"]
    assert gemm["gemm_calls"] > 0 and 0 < gemm["gemm_s"] <= gemm["profiled_ops_s"] and 0 < gemm["share"] <= 1
    assert 0 < exps["harness"]["per_call_s"] < 1e-3


@pytest.mark.parametrize("spec, orders", [("strassen", [2, 2, 2]), ("triple", [3])])
def test_term_phase_plans(tmp_path, spec, orders):
    plans = term_phase_plans(spec, (1024, 65536), 6)
    assert plans["orders"] == orders
    for size in plans["sizes"]:
        assert size["taus"] == [pytest.approx(math.log(size["n"]) ** (1 / k)) for k in orders]
        ranks = [max(p["ranks"]) for p in size["points"] if p["ranks"]]
        assert ranks and ranks == sorted(ranks), "the rank needed grows with B"
        for p in size["points"]:
            assert p["term_B"] == [pytest.approx(p["B"])] * len(orders)  # scale 1/d: B_t = B
            assert p["passed"] == all(b < t for b, t in zip(p["term_B"], size["taus"]))
    assert "threshold" in term_phase(plans, tmp_path / "phase.png") and (tmp_path / "phase.png").stat().st_size


def test_fixed_degree_past_certification_is_recorded_not_raised(tmp_path):
    """Past the largest certifiable radius the planner refuses a pinned degree: the point is kept
    without an error and left out of the plot."""
    suite = replace(get_suite("micro"), fixed_sizes=((2, 64, 4),), fixed_ratios=(0.5, 4.0))
    exp = fixed_degree_experiment(suite)
    ok, past = exp["2"]["points"]
    assert ok["max_error"] <= ok["error_bound"] and past["max_error"] is None and past["error_bound"] is None
    assert fixed_degree(exp, tmp_path / "fixed.png") and (tmp_path / "fixed.png").stat().st_size


def test_measure_and_peak_memory():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.002)
        return len(calls)

    timing, result = measure(nap, warmup=2, repeats=3, min_repeats=3)
    assert timing.repeats == 3 and len(calls) == 5 and result == 5
    assert min(timing.times) >= 0.002 and timing.median == sorted(timing.times)[1]
    with PeakMemory() as mem:
        block = np.ones(4 << 20)  # 32 MiB, touched
        del block
    if mem.peak_bytes is None:
        pytest.skip("this kernel has no resettable VmHWM (/proc/self/clear_refs)")
    assert mem.peak_bytes >= 16 << 20


def test_interleaved_calls_round_robin():
    calls = []
    fns = {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)}
    timings, last = interleaved(fns, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and last == {"a": 7, "b": 8}
    assert all(t.repeats == 3 and t.median == sorted(t.times)[1] for t in timings.values())
    assert all(len(t.cpu_times) == 3 and 0 <= t.cpu_median for t in timings.values())
    spin, _ = interleaved({"spin": lambda: sum(range(200_000))}, rounds=2, warmup=0)
    assert spin["spin"].cpu_median > 0 and min(spin["spin"].cpu_times) <= max(spin["spin"].times) * 1.05
    calls.clear()
    timings, _ = interleaved(fns, rounds=5, warmup=0, max_seconds=0.0, min_rounds=2)
    assert calls == ["a", "b"] * 2 and timings["a"].repeats == 2


def test_affine_estimate_and_visible_tuples():
    est = AffineEstimate(rows=(8, 16), work=(800.0, 1600.0), seconds=(1.0, 1.5), full_work=8000.0)
    assert est.slope == pytest.approx(0.5 / 800) and est.intercept == pytest.approx(0.5)
    assert est.seconds_full == pytest.approx(5.5) and est.method == "affine"
    noisy = AffineEstimate(rows=(8, 16), work=(800.0, 1600.0), seconds=(2.0, 1.5), full_work=8000.0)
    assert noisy.method == "proportional" and noisy.seconds_full == pytest.approx(7.5)
    assert visible_tuples(10, 10, 2, False) == 100
    assert visible_tuples(4, 4, 2, True) == 1 + 2 + 3 + 4
    assert visible_tuples(4, 4, 3, True, q_offset=2, rows=2) == 9 + 16


def test_crossover():
    ns = [256, 1024, 4096, 16384]
    assert crossover(ns, [1, 1, 1, 1], [2, 2, 2, 2]) == 256
    assert crossover(ns, [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]) is None
    x = crossover(ns, [1, 1, 1, 1], [0.5, 0.5, 2, 4])
    assert 1024 < x < 4096 and x == pytest.approx(2048, rel=1e-9)  # log-log midpoint


def test_override_replaces_the_sweep():
    suite = override(get_suite("default"), spec=["triple"], n=[64], backend=["poly", "favor"])
    assert [(c.spec, c.backend, c.n) for c in suite.cases] == [("triple", "poly", 64), ("triple", "favor", 64)]
    assert suite.parts == ("sweep", "targets")
    same = override(get_suite("default"))
    assert same.cases == get_suite("default").cases
    with pytest.raises(ta.InputError, match="unknown part"):
        override(suite, parts=["sweep", "plots"])
    with pytest.raises(ta.InputError, match="unknown suite 'nope'; valid suites are 'default', 'full', 'micro'"):
        get_suite("nope")


def test_poly_at_degree_is_certified():
    q, k, v = random_inputs("pairwise", n=64, d=4, bound=1.5, dtype=np.float64, seed=3)
    ref = reference_attention(q, k, v, scale=0.25)
    errors = []
    for g in (1, 3, 6):
        out, bound = poly_at_degree(q, k, v, spec="pairwise", degree=g, scale=0.25)
        errors.append(float(np.abs(out - ref).max()))
        assert errors[-1] <= bound
    assert errors[0] > errors[1] > errors[2]


def test_non_monotone_rows_are_found():
    from tensorattn.bench.runner import non_monotone

    def row(backend, n, t, causal=False):
        return dict(spec="pairwise", backend=backend, n=n, d=8, B=1.0, tol=1e-3, causal=causal, status="ok",
                    median_s=t)

    rows = [row("poly", 64, 1.0), row("poly", 128, 0.5), row("poly", 256, 2.0), row("exact", 64, 1.0),
            row("exact", 128, 0.95), row("poly", 128, 0.1, causal=True)]
    assert non_monotone(rows) == {1}  # 5% faster is within the slack; other settings are other groups


def test_load_probe_and_spread():
    from tensorattn.bench.measure import LoadProbe, measure

    with LoadProbe() as probe:
        sum(range(200_000))
        time.sleep(0.06)
    assert probe.foreign is None or 0.0 <= probe.foreign <= 1.0
    timing, _ = measure(lambda: None, warmup=0, repeats=50, min_repeats=3, max_spread=10.0)
    assert timing.repeats == 3 and timing.spread >= 0.0  # stops once the spread is small enough


def test_missing_matplotlib_is_said_before_the_run(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    start = time.perf_counter()
    with pytest.raises(ta.InputError, match=r"need matplotlib.*tensorattn\[bench\].*--no-plots"):
        run_bench("micro", tmp_path, progress=False)
    assert time.perf_counter() - start < 1.0 and not (tmp_path / "results.json").exists()
