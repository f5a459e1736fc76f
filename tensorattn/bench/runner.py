"""The sweep: every case of a suite timed, its peak memory and its max error vs exact recorded.

Cases that share (spec, n, d, B, causal) share inputs and one float64 exact reference on a subset
of query rows. Quadratic backends (exact, sdpa) past ``Suite.quadratic_work_cap`` visited key
tuples are estimated: two fractions of the query rows are timed and the time is extrapolated
affinely in the number of visited key tuples (the exact cost is linear in query rows), and the row
is marked ``estimated``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .. import api
from ..approx.features import rank_for
from ..errors import BoundError, TensorAttnError
from ..request import Request
from ..spec import get_spec
from ..testing import random_inputs, random_rel
from .measure import AffineEstimate, PeakMemory, load_average, measure, single_thread, visible_tuples
from .suites import QUADRATIC_BACKENDS, Case, Suite


@dataclass
class Inputs:
    """One input set in float32 (timed) and float64 (reference), batch dim 1."""

    case: Case
    q: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rel: torch.Tensor | None
    ref_rows: tuple[int, int] | None = None
    reference: torch.Tensor | None = None
    poly_rank: int | None = None

    @property
    def order(self) -> int:
        return len(self.keys) + 1

    def args(self, rows: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32):
        """(q, k, v, options) for query rows [a, b); keys and values always whole."""
        a, b = rows if rows is not None else (0, self.case.n)
        q = self.q[:, a:b].to(dtype)
        ks = [k.to(dtype) for k in self.keys]
        vs = [v.to(dtype) for v in self.values]
        opts: dict[str, Any] = {}
        if a > 0:  # the rows keep their positions (causal mask, rope angles, W offsets)
            opts["q_offset"] = a
        if self.rel is not None:
            # W[i - j + m - 1] for queries at positions a..b-1 needs the first b + m - 1 matrices
            opts["rel"] = self.rel[: b + self.keys[0].shape[1] - 1].to(dtype)
        if self.order == 2:
            return q, ks[0], vs[0], opts
        return q, tuple(ks), tuple(vs), opts


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    q, k, v = random_inputs(case.spec, case.n, case.d, bound=case.B, dtype=np.float32, seed=seed, batch=(1,))
    ks = [k] if not isinstance(k, tuple) else list(k)
    vs = [v] if not isinstance(v, tuple) else list(v)
    rel = None
    if get_spec(case.spec).positional == "relative":
        rel = torch.from_numpy(random_rel(case.n, case.n, case.d, kind="rope"))
    t = torch.from_numpy
    return Inputs(case, t(q), [t(x) for x in ks], [t(x) for x in vs], rel)


def _rows_for(work_per_row: float, cap: float, n: int, lo: int) -> int:
    return int(max(min(lo, n), min(n, cap // max(work_per_row, 1.0))))


def reference(inp: Inputs, suite: Suite) -> tuple[tuple[int, int], torch.Tensor]:
    """float64 exact output on a block of query rows: the first rows, or the last when causal
    (they see the most keys). At most ``suite.error_work_cap`` key tuples are visited."""
    if inp.reference is None:
        c = inp.case
        rows = _rows_for(float(c.n) ** (inp.order - 1), suite.error_work_cap, c.n, 16)
        span = (c.n - rows, c.n) if c.causal else (0, rows)
        q, k, v, opts = inp.args(span, torch.float64)
        with torch.no_grad(), single_thread():
            inp.reference = api.attention(q, k, v, spec=c.spec, backend="exact", scale=1.0 / c.d,
                                          causal=c.causal, **opts)
        inp.ref_rows = span
    return inp.ref_rows, inp.reference


def _max_error(out: torch.Tensor, out_rows: tuple[int, int], inp: Inputs, suite: Suite) -> tuple[float, int]:
    (ra, rb), ref = reference(inp, suite)
    a, b = max(ra, out_rows[0]), min(rb, out_rows[1])
    if b <= a:  # pragma: no cover - fractions and references overlap by construction
        return math.nan, 0
    got = out[:, a - out_rows[0]: b - out_rows[0]].to(torch.float64)
    want = ref[:, a - ra: b - ra]
    return float((got - want).abs().max()), b - a


def _equal_rank(inp: Inputs, case: Case) -> int:
    """The rank poly certifies for these inputs and tol (favor is compared at that rank)."""
    if inp.poly_rank is None:
        q, k, v, opts = inp.args()
        plan = api.check_bounds(q, k, v, spec=case.spec, scale=1.0 / case.d, tol=case.tol, causal=case.causal,
                                **opts)
        inp.poly_rank = plan.rank if plan.rank is not None else Request().features
    return inp.poly_rank


def _row(case: Case, **fields) -> dict:
    row = dict(
        spec=case.spec, backend=case.backend, n=case.n, d=case.d, B=case.B, tol=case.tol, causal=case.causal,
        status="ok", median_s=None, repeats=0, times_s=[], peak_mem_mib=None, peak_rss_mib=None,
        max_error=None, error_rows=0, error_bound=None, degree=None, rank=None, estimated=False,
        estimate_rows=None, measured_full_s=None, beta=None, B_eff=None, threshold=None, note="",
        spread=None, foreign_load=None, rerun=False, noisy=False, non_monotone=False,
    )
    row.update(fields)
    # plain Python numbers, so rows compare and serialize like the JSON they become
    return {k: (v.item() if isinstance(v, (np.generic,)) else v) for k, v in row.items()}


def run_case(case: Case, inp: Inputs, suite: Suite, validate: bool = False) -> dict:
    order = inp.order
    kwargs: dict[str, Any] = dict(spec=case.spec, backend=case.backend, scale=1.0 / case.d, tol=case.tol,
                                  causal=case.causal, return_info=True)
    rank = degree = None
    try:
        if case.backend == "favor":
            rank = _equal_rank(inp, case)
            kwargs["features"] = rank
        elif case.backend == "taylor2":
            D = case.d  # every built-in spec contracts one index of size d
            rank, degree = rank_for(D, 2), 2
        full_work = visible_tuples(case.n, case.n, order, case.causal)
        if case.backend in QUADRATIC_BACKENDS and full_work > suite.quadratic_work_cap:
            fields = _estimated(case, inp, suite, kwargs, full_work, validate)
        else:
            fields = _measured(case, inp, suite, kwargs)
    except BoundError as exc:
        return _row(case, status="refused", note=str(exc).split(". ")[0])
    except TensorAttnError as exc:
        return _row(case, status="n/a", note=str(exc))
    info = fields.pop("info")
    if case.backend == "poly":
        degree, rank = info.degree, info.rank
    return _row(case, degree=degree, rank=rank, error_bound=info.error_bound, beta=info.beta, B_eff=info.B,
                threshold=info.threshold, **fields)


def _call(inp: Inputs, kwargs: dict, rows: tuple[int, int] | None = None):
    q, k, v, opts = inp.args(rows)  # built before timing; the inputs do not require grad
    return lambda: api.attention(q, k, v, **kwargs, **opts)


def _measured(case: Case, inp: Inputs, suite: Suite, kwargs: dict) -> dict:
    fn = _call(inp, kwargs)
    with PeakMemory() as mem:
        timing, (out, info) = measure(fn, warmup=suite.warmup, repeats=suite.repeats,
                                      min_repeats=suite.min_repeats, max_seconds=suite.max_case_seconds,
                                      max_spread=suite.max_spread)
    err, err_rows = _max_error(out, (0, case.n), inp, suite)
    return dict(info=info, median_s=timing.median, repeats=timing.repeats, times_s=list(timing.times),
                peak_mem_mib=_mib(mem.peak_bytes), peak_rss_mib=_mib(mem.peak_rss_bytes), max_error=err,
                error_rows=err_rows, spread=timing.spread, foreign_load=timing.foreign_load)


def _estimated(case: Case, inp: Inputs, suite: Suite, kwargs: dict, full_work: float, validate: bool) -> dict:
    order, n = inp.order, case.n
    per_row = float(n) ** (order - 1)
    # r and r/4 rows: a wide spread keeps the fitted slope from amplifying timing noise
    r2 = min(n // 2, _rows_for(per_row, suite.estimate_work, n, 16))
    r1 = max(1, r2 // 4)
    spans = [(n - r, n) if case.causal else (0, r) for r in (r1, r2)]
    seconds, works, times, spreads, loads = [], [], [], [], []
    with PeakMemory() as mem:
        for span in spans:
            fn = _call(inp, kwargs, span)
            timing, (out, info) = measure(fn, warmup=suite.warmup, repeats=suite.repeats,
                                          min_repeats=suite.min_repeats, max_seconds=suite.max_case_seconds,
                                          max_spread=suite.max_spread)
            seconds.append(timing.median)
            times.extend(timing.times)
            spreads.append(timing.spread)
            loads.append(timing.foreign_load)
            works.append(visible_tuples(n, n, order, case.causal, q_offset=span[0], rows=span[1] - span[0]))
    est = AffineEstimate((r1, r2), tuple(works), tuple(seconds), full_work)
    err, err_rows = _max_error(out, spans[1], inp, suite)
    fields = dict(info=info, median_s=est.seconds_full, repeats=len(times), times_s=times,
                  peak_mem_mib=_mib(mem.peak_bytes), peak_rss_mib=_mib(mem.peak_rss_bytes), max_error=err,
                  error_rows=err_rows, estimated=True, estimate_rows=[r1, r2], spread=max(spreads),
                  foreign_load=None if None in loads else max(loads),
                  note=f"estimated from query rows {r1} and {r2} of {n} ({est.method} in visited key tuples)")
    if validate:
        full = _measured(case, inp, suite, kwargs)
        fields["measured_full_s"] = full["median_s"]
        fields["note"] += f"; measured in full: {full['median_s']:.3g} s"
    return fields


def _mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20


def _unsteady(row: dict, suite: Suite) -> bool:
    """Timed under load from other processes, or with a spread past the suite's limit."""
    if row["status"] != "ok":
        return False
    loaded = row.get("foreign_load") is not None and row["foreign_load"] > suite.load_limit
    return loaded or (row.get("spread") or 0.0) > suite.max_spread


def non_monotone(rows: list[dict], slack: float = 0.8) -> set[int]:
    """Indices of rows whose time is below ``slack`` times the time of the same backend and
    settings at a smaller n (more work measured as faster: noise, or a warm-up effect)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r["status"] == "ok" and r["median_s"] is not None:
            groups.setdefault((r["spec"], r["backend"], r["d"], r["B"], r["tol"], r["causal"]), []).append(i)
    bad = set()
    for idx in groups.values():
        idx.sort(key=lambda i: rows[i]["n"])
        slowest = 0.0
        for i in idx:
            if rows[i]["median_s"] < slack * slowest:
                bad.add(i)
            slowest = max(slowest, rows[i]["median_s"])
    return bad


def _rerun(rows: list[dict], suite: Suite, which: list[int], progress=None) -> None:
    """Time the given cases again (after the sweep, when the load may have passed) and keep the
    steadier measurement; a case that stays unsteady is flagged ``noisy``."""
    budget = time.perf_counter() + suite.rerun_seconds
    cases = {i: Case(rows[i]["spec"], rows[i]["backend"], rows[i]["n"], rows[i]["d"], rows[i]["B"], rows[i]["tol"],
                     rows[i]["causal"]) for i in which}
    order = sorted(which, key=lambda i: cases[i].input_key)
    inp = None
    it = progress(order, desc="rerun", unit="case") if progress else order
    for i in it:
        if time.perf_counter() > budget:
            break
        case = cases[i]
        if inp is None or inp.case.input_key != case.input_key:
            inp = None
            inp = make_inputs(case)
        new = run_case(case, inp, suite)
        old = rows[i]
        new["load1"] = old.get("load1")
        new["case_wall_s"] = old.get("case_wall_s")
        if new["status"] == "ok" and (_unsteady(old, suite) or not _unsteady(new, suite)):
            keep_new = (new.get("foreign_load") or 0.0) <= (old.get("foreign_load") or 0.0) or not _unsteady(new, suite)
            if keep_new:
                new["rerun"] = True
                rows[i] = new
                continue
        old["rerun"] = True


def run_sweep(suite: Suite, progress=None, cases: tuple[Case, ...] | None = None, estimate: bool = True,
              desc: str = "sweep") -> list[dict]:
    """Run every case (``suite.cases``, or ``cases``); ``progress`` wraps an iterable (tqdm) or is
    None. ``estimate=False`` measures every case in full. After the sweep, the unsteady cases and
    those whose time falls as n grows run again, and what stays so is flagged (``noisy``,
    ``non_monotone``)."""
    if not estimate:
        suite = replace(suite, quadratic_work_cap=math.inf)
    order = {}
    # group cases that share inputs, keeping the suite's order otherwise
    for case in suite.cases if cases is None else cases:
        order.setdefault(case.input_key, []).append(case)
    cases = [c for group in order.values() for c in group]
    rows = []
    validated: set[tuple] = set()
    inp = None
    it = progress(cases, desc=desc, unit="case") if progress else cases
    for case in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"{case.spec} {case.backend} n={case.n}")
        if inp is None or inp.case.input_key != case.input_key:
            inp = None  # one input set resident at a time
            inp = make_inputs(case)
        vkey = (case.spec, case.backend, case.causal)
        t0 = time.perf_counter()
        row = run_case(case, inp, suite, validate=suite.validate_estimates and vkey not in validated)
        row["case_wall_s"] = time.perf_counter() - t0  # warm-ups, repeats and the reference included
        loads = load_average()
        row["load1"] = loads[0] if loads else None
        if row["measured_full_s"] is not None:
            validated.add(vkey)
        rows.append(row)
    inp = None
    suspects = sorted({i for i, r in enumerate(rows) if _unsteady(r, suite)} | non_monotone(rows))
    if suspects and suite.rerun_seconds > 0:
        _rerun(rows, suite, suspects, progress)
    for r in rows:
        r["noisy"] = _unsteady(r, suite)
    for i in non_monotone(rows):
        rows[i]["non_monotone"] = True
    return rows
