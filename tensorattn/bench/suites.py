"""Suite definitions: which cases run, with which timing and estimation limits.

A ``Case`` is one row of results.csv: (spec, backend, n, d, B, tol, causal). Inputs are uniform in
[-B, B] for q and the keys and in [-1, 1] for the values, with ``scale = 1/d`` (the papers'
convention, so B is the papers' entry bound; docs/design.md#the-bound-check).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from ..checks import check_bool, check_int, check_number
from ..errors import InputError, valid_names
from ..spec import get_spec

#: every backend the sweep compares; a backend that cannot serve a spec gives an "n/a" row
SWEEP_BACKENDS = ("poly", "exact", "sdpa", "favor", "taylor2")
#: backends whose cost grows with n * m^(k-1); only these are estimated from a fraction of rows
QUADRATIC_BACKENDS = ("exact", "sdpa")
PARTS = ("sweep", "targets", "poly", "rank", "phase", "fixed", "needle", "grad", "gemm", "rss")
#: the attention polynomials of the "poly" part, with the d of their headline sizes
POLY_SPECS = (("strassen", 4), ("tree", 8))


@dataclass(frozen=True)
class Case:
    spec: str
    backend: str
    n: int
    d: int = 8
    B: float = 1.0
    tol: float = 1e-3
    causal: bool = False

    @property
    def input_key(self) -> tuple:
        """Cases with the same key share inputs and the exact reference."""
        return (self.spec, self.n, self.d, self.B, self.causal)


@dataclass(frozen=True)
class Suite:
    """A named set of cases and experiment sizes. See ``SUITES`` for the built-in ones."""

    name: str
    cases: tuple[Case, ...]
    parts: tuple[str, ...] = PARTS
    warmup: int = 1
    repeats: int = 7
    min_repeats: int = 3
    max_case_seconds: float = 1.5
    #: timed calls continue (up to ``repeats``) until (median - fastest) / fastest is at most this
    max_spread: float = 0.1
    #: a case timed while other processes used more than this share of the CPU is rerun
    load_limit: float = 0.25
    #: wall-time budget for rerunning unsteady and non-monotone cases after the sweep
    rerun_seconds: float = 30.0
    #: quadratic backends run on all rows while they visit at most this many key tuples
    quadratic_work_cap: float = 2.0**30
    #: past it, the larger of the two timed row blocks visits about this many key tuples
    estimate_work: float = 2.0**27
    #: the float64 exact reference visits at most this many key tuples (a subset of rows)
    error_work_cap: float = 2.0**24
    #: also measure the first estimated case of each (spec, backend) in full, to check the estimate
    validate_estimates: bool = False
    # error vs rank (pairwise, d = 8)
    rank_n: int = 2048
    rank_degrees: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    favor_seeds: tuple[int, ...] = (0, 1, 2)
    # phase transition from plans: sizes whose tau_k(n) lines are drawn
    plan_ns: tuple[int, ...] = (2**10, 2**16, 2**20)
    plan_points: int = 36
    # fixed-degree poly as B crosses tau_k(n): (n, d) per order
    fixed_sizes: tuple[tuple[int, int, int], ...] = ((2, 1024, 8), (3, 256, 8))
    fixed_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
    # needle: n values (d = 2 log2 n), queries per n, points on the B^2 / ln n axis
    needle_ns: tuple[int, ...] = (256, 1024, 4096)
    needle_queries: int = 256
    needle_points: int = 40
    # forward + backward (training step) sizes, pairwise
    grad_ns: tuple[int, ...] = (1024, 4096)
    # the headline sizes of the performance targets
    target_n: int = 65536
    triple_target_n: int = 1024
    gemm_n: int = 65536
    #: exact pairwise peak RSS at target_n runs in a fresh process over this many query rows
    #: (None: all rows). The exact backend processes query chunks one after another, so any row
    #: count of at least one chunk reaches the full run's peak.
    rss_rows: int | None = 8192
    #: the "poly" part: exact and poly of the attention polynomials (strassen, tree), measured in
    #: full at every n (no row-fraction estimate: a tree's inner edges cost n^2 whatever the rows)
    poly_cases: tuple[Case, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def _grid(spec: str, ns, backends=SWEEP_BACKENDS, *, d: int = 8, B: float = 1.0, tol: float = 1e-3,
          causal: bool = False) -> list[Case]:
    return [Case(spec, b, n, d, B, tol, causal) for n in ns for b in backends]


def _poly_grid(strassen_ns, tree_ns) -> tuple[Case, ...]:
    ns = dict(strassen=strassen_ns, tree=tree_ns)
    return tuple(c for spec, d in POLY_SPECS for c in _grid(spec, ns[spec], ("poly", "exact"), d=d))


def default_suite() -> Suite:
    cases = (
        _grid("pairwise", (256, 1024, 2048, 4096, 16384, 65536))
        + _grid("pairwise", (4096,), causal=True)
        + _grid("triple", (64, 128, 256, 512, 1024))
        + _grid("rope", (4096,))
        + _grid("relative", (512,))
    )
    return Suite("default", tuple(cases), poly_cases=_poly_grid((128, 256, 512), (1024, 2048, 4096)))


def full_suite() -> Suite:
    cases = (
        _grid("pairwise", (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072))
        + _grid("pairwise", (1024, 4096, 16384), causal=True)
        + _grid("pairwise", (4096, 16384), d=16)
        + _grid("triple", (64, 128, 256, 512, 1024, 2048))
        + _grid("triple", (256, 1024), causal=True)
        + _grid("rope", (1024, 4096, 16384))
        + _grid("relative", (1024, 4096))
    )
    return Suite(
        "full", tuple(cases), repeats=5, min_repeats=3, max_case_seconds=10.0, rerun_seconds=120.0,
        quadratic_work_cap=2.0**31, estimate_work=2.0**29, error_work_cap=2.0**26, validate_estimates=True,
        rank_n=4096, rank_degrees=(1, 2, 3, 4, 5, 6, 7), favor_seeds=(0, 1, 2, 3, 4),
        plan_points=60, fixed_sizes=((2, 4096, 8), (3, 512, 8)), needle_ns=(256, 1024, 4096, 16384),
        needle_queries=512, grad_ns=(1024, 4096, 16384), rss_rows=None,
        poly_cases=_poly_grid((256, 512, 1024, 2048), (2048, 4096, 8192, 16384)),
    )


def micro_suite() -> Suite:
    """Seconds, not minutes: for tests and the docs example."""
    cases = _grid("pairwise", (64, 128)) + _grid("triple", (32,), ("poly", "exact", "favor"))
    return Suite(
        "micro", tuple(cases), parts=tuple(p for p in PARTS if p != "rss"),
        warmup=0, repeats=1, min_repeats=1, max_case_seconds=0.5, rerun_seconds=2.0,
        quadratic_work_cap=2.0**12, estimate_work=2.0**10,
        error_work_cap=2.0**14, rank_n=128, rank_degrees=(1, 2, 3), favor_seeds=(0,), plan_ns=(2**10,),
        plan_points=6, fixed_sizes=((2, 64, 4), (3, 24, 4)), fixed_ratios=(0.5, 1.0, 1.5),
        needle_ns=(64,), needle_queries=16, needle_points=6, grad_ns=(64,), target_n=128, triple_target_n=32,
        gemm_n=256, rss_rows=64, poly_cases=_poly_grid((32,), (64,)),
    )


SUITES = {"default": default_suite, "full": full_suite, "micro": micro_suite}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]()
    except KeyError:
        raise InputError(f"unknown suite {name!r}; valid suites are {', '.join(map(repr, SUITES))}") from None


def override(suite: Suite, *, spec=None, backend=None, n=None, d=None, B=None, tol=None, causal=None,
             parts=None) -> Suite:
    """Replace the sweep by the product of the given values (defaults: pairwise, every backend,
    n = 1024 and 4096, d = 8, B = 1, tol = 1e-3, non-causal). With no value given, the suite is
    unchanged apart from ``parts``."""
    given = [x for x in (spec, backend, n, d, B, tol, causal) if x]
    for name in spec or ():
        get_spec(name)  # an unknown spec is a SpecError that lists the registered ones
    for name in backend or ():
        if name not in SWEEP_BACKENDS:
            raise InputError(f"unknown backend {name!r} for the sweep; valid backends are "
                             f"{valid_names(name, SWEEP_BACKENDS)}")
    n = [check_int("n", x, low=1, hint="a sequence length") for x in n or ()]
    d = [check_int("d", x, low=1, hint="a head dim") for x in d or ()]
    B = [check_number("B", x, low=0.0, hint="an entry bound") for x in B or ()]
    tol = [check_number("tol", x, low=0.0, high=1.0, low_open=True, high_open=True) for x in tol or ()]
    causal = [check_bool("causal", x) for x in causal or ()]
    if given:
        product = itertools.product(
            spec or ("pairwise",), backend or SWEEP_BACKENDS, n or (1024, 4096), d or (8,),
            B or (1.0,), tol or (1e-3,), causal if causal else (False,),
        )
        cases = tuple(Case(s, b, int(nn), int(dd), float(bb), float(tt), bool(cc))
                      for s, b, nn, dd, bb, tt, cc in product)
        suite = replace(suite, cases=cases, parts=("sweep", "targets"))
    if parts:
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise InputError(f"unknown part {unknown[0]!r}; valid parts are {', '.join(PARTS)}")
        suite = replace(suite, parts=tuple(parts))
    return suite
