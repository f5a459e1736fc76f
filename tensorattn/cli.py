"""The ``tensorattn`` console script.

    tensorattn bench [--suite default|full|micro] [--out DIR] [--spec ...] [--backend ...] [--n ...]
                     [--d ...] [--B ...] [--tol ...] [--causal ...] [--parts ...]
    tensorattn check --spec pairwise --n 65536 --d 8 --B 1.0 [--tol 1e-3] [--scale 1/d]
    tensorattn check --npz inputs.npz --spec triple

``check`` prints the plan and exits 0 when poly may run, 1 when it is refused (B past the threshold,
or no certified degree within max_degree / max_rank), 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Sequence

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false or 1/0, got {text!r}")


def _scale(text: str):
    """A number, or '1/d' / '1/sqrt(d)' (resolved once D is known)."""
    low = text.replace(" ", "").lower()
    if low in ("1/d", "1/sqrt(d)"):
        return low
    try:
        if "/" in low:  # e.g. 1/8
            num, den = low.split("/", 1)
            return float(num) / float(den)
        return float(low)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--scale expects a number, '1/d' or '1/sqrt(d)', got {text!r}") from None


def _resolve_scale(scale, D: int) -> float | None:
    if scale == "1/d":
        return 1.0 / D
    if scale == "1/sqrt(d)":
        return 1.0 / math.sqrt(D)
    return scale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorattn", description="Generalized (higher-order) attention tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run the benchmark suite and write tables and plots",
                           description="Run a benchmark suite; write results.json, results.csv, report.md and "
                                       "PNG plots. Any of --spec/--backend/--n/--d/--B/--tol/--causal replaces "
                                       "the suite's sweep by the product of the given values.")
    bench.add_argument("--suite", default="default", help="default (< 3 min on 2 cores), full, or micro")
    bench.add_argument("--out", default="bench-results", help="output directory (default ./bench-results)")
    bench.add_argument("--spec", nargs="+", help="specs to sweep (e.g. pairwise triple rope)")
    bench.add_argument("--backend", nargs="+", help="backends to sweep (poly exact sdpa favor taylor2)")
    bench.add_argument("--n", nargs="+", type=int, help="sequence lengths")
    bench.add_argument("--d", nargs="+", type=int, help="head dims")
    bench.add_argument("--B", nargs="+", type=float, help="entry bounds (entries uniform in [-B, B], scale 1/d)")
    bench.add_argument("--tol", nargs="+", type=float, help="poly tolerances")
    bench.add_argument("--causal", nargs="+", type=_bool, help="causal flags (true/false)")
    bench.add_argument("--parts", nargs="+",
                       help="parts to run: sweep targets poly rank phase fixed needle grad gemm rss")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")

    check = sub.add_parser("check", help="print the plan / bound check; exit 1 when poly is refused",
                           description="Explain how tensorattn would compute a call and whether the polynomial "
                                       "method is allowed (exit 0) or refused (exit 1).")
    check.add_argument("--spec", default="pairwise", help="spec name (default pairwise)")
    check.add_argument("--n", type=int, help="number of queries")
    check.add_argument("--m", type=int, help="number of keys per slot (default n)")
    check.add_argument("--d", type=int, help="size of every contracted index")
    check.add_argument("--B", type=float, help="largest |entry| of q and the keys")
    check.add_argument("--npz", help=".npz with arrays q, k (or k1, k2, ...) and optionally v (or v1, v2, ...)")
    check.add_argument("--tol", type=float, default=1e-3, help="certified max|out - exact| / max|v| (1e-3)")
    check.add_argument("--scale", type=_scale, default=None,
                       help="score scale: a number, '1/d' (the papers' convention, B is then their entry "
                            "bound) or '1/sqrt(d)' (the library default)")
    check.add_argument("--causal", action="store_true", help="causal attention")
    check.add_argument("--max-degree", type=int, default=None, help="largest polynomial degree allowed (40)")
    check.add_argument("--max-rank", type=int, default=None, help="largest rank allowed")
    return parser


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench import run_bench
    from .bench.measure import available_cores, load_average, others_busy

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "tensorattn " + " ".join(shlex.quote(a) for a in argv)
    loads = load_average()
    if loads and others_busy(loads[0]):  # someone else is computing: say so before the numbers come out
        print(f"note: the machine is busy (1-minute load {loads[0]:.1f} on {available_cores()} cores); timings "
              "will be noisy", file=sys.stderr)
    results = run_bench(
        args.suite, args.out, progress=not args.no_progress, plots_enabled=not args.no_plots, command=command,
        spec=args.spec, backend=args.backend, n=args.n, d=args.d, B=args.B, tol=args.tol, causal=args.causal,
        parts=args.parts,
    )
    print(f"wrote {args.out}/results.json, results.csv, report.md and {len(results['figures'])} plots "
          f"in {results['wall_s']:.0f} s")
    for t in results["targets"]:
        met = "" if t["met"] is None else ("  [met]" if t["met"] else "  [NOT met]")
        print(f"  {t['workload']}: {t['measured']} (target {t['target']}){met}")
    return EXIT_OK


def _load_npz(path: str, order: int):
    import numpy as np

    data = np.load(path)
    names = set(data.files)
    if "q" not in names:
        raise KeyError(f"{path} has arrays {sorted(names)} but no 'q'")

    def slot_arrays(prefix: str, required: bool):
        found = []
        for i in range(1, order):
            for name in ((f"{prefix}{i}", prefix) if i == 1 else (f"{prefix}{i}",)):
                if name in names:
                    found.append(data[name])
                    break
            else:
                if required:
                    want = " and ".join(f"'{prefix}{j}'" for j in range(1, order)) if order > 2 else f"'{prefix}'"
                    raise KeyError(f"{path} has arrays {sorted(names)}; an order-{order} spec needs {want}")
                return None
        return found

    keys = slot_arrays("k", True)
    values = slot_arrays("v", False)
    if order == 2:
        return data["q"], keys[0], None if values is None else values[0]
    return data["q"], tuple(keys), None if values is None else tuple(values)


def _check(args: argparse.Namespace) -> int:
    import tensorattn as ta

    spec = ta.get_spec(args.spec)
    options = {}
    if args.max_degree is not None:
        options["max_degree"] = args.max_degree
    if args.max_rank is not None:
        options["max_rank"] = args.max_rank
    if args.npz:
        try:
            q, k, v = _load_npz(args.npz, spec.order)
        except (OSError, KeyError, ValueError) as exc:
            raise ta.InputError(f"--npz {args.npz}: {exc}") from None
        plan = ta.check_bounds(q, k, v, spec=spec, tol=args.tol, causal=args.causal, **options)
        if args.scale is not None:  # D is known from the arrays now
            plan = ta.check_bounds(q, k, v, spec=spec, scale=_resolve_scale(args.scale, plan.D), tol=args.tol,
                                   causal=args.causal, **options)
    else:
        missing = [f"--{name}" for name in ("n", "d", "B") if getattr(args, name) is None]
        if missing:
            raise ta.InputError(f"tensorattn check needs {', '.join(missing)} (or --npz FILE with the arrays)")
        D = spec.feature_dim({c: args.d for c in spec.contracted})
        plan = ta.plan(spec, n=args.n, m=args.m, d=args.d, bound=args.B, tol=args.tol,
                       scale=_resolve_scale(args.scale, D), causal=args.causal, **options)
    print(plan)
    max_rank = plan.request.max_rank
    k = plan.order
    n_max = max(plan.n, *plan.ms)
    if not plan.passed:
        print(f"poly: REFUSED. B = {plan.B:.4g} is not below tau_{k}(n) = (ln {n_max})^(1/{k}) = "
              f"{plan.threshold:.4g}: past the threshold no algorithm is truly sub-n^{k} under SETH. "
              "Use backend='exact' (or 'auto').")
        return EXIT_REFUSED
    if plan.certificate is None:
        print(f"poly: REFUSED. No degree <= max_degree = {plan.request.max_degree} certifies "
              f"tol = {plan.tol:g} at beta = {plan.beta:.4g}.")
        return EXIT_REFUSED
    if plan.rank > max_rank:
        print(f"poly: REFUSED. tol = {plan.tol:g} needs rank {plan.rank:,} > max_rank = {max_rank:,}.")
        return EXIT_REFUSED
    print(f"poly: allowed. B = {plan.B:.4g} < tau_{k}(n) = {plan.threshold:.4g}; degree {plan.degree}, rank "
          f"{plan.rank:,} certify max|out - exact| <= {plan.certificate.output_error:.3g} * max|v|. "
          f"backend='auto' would run {plan.backend} ({plan.reason}).")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensorattn`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    from .errors import TensorAttnError

    try:
        if args.command == "bench":
            return _bench(args, argv)
        return _check(args)
    except TensorAttnError as exc:
        print(f"tensorattn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
