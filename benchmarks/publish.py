"""Run a benchmark suite into benchmarks/latest/ and rewrite benchmarks/README.md from its results.

    python benchmarks/publish.py                 # default suite (< 3 min on 2 cores)
    python benchmarks/publish.py --suite full    # the larger sweeps
    python benchmarks/publish.py --from-results  # redraw plots and README.md from latest/results.json
    python benchmarks/publish.py --from-results --full-results full/results.json  # add a full run's checks

The README holds the performance targets next to the measured ratios, the tables and the plots
of the latest run, and the command that reproduces them.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from tensorattn.bench import replot, run_bench
from tensorattn.bench.report import markdown, write_json

HERE = Path(__file__).resolve().parent
LATEST = HERE / "latest"
#: sections that other scripts write (each its own section.md), inserted after the suite's run
INCLUDES = (
    ("Attention polynomials", "latest_poly", "benchmarks/poly_attention.py",
     "Strassen and tree attention (docs/poly-attention.md) against triple: the structured exact backends and "
     "poly, time and memory against n, the headline checks, and the rank each structure needs against the entry "
     "bound."),
    ("Peer packages", "latest_peers", "benchmarks/peers.py",
     "Side by side with strassen-attention and poly-attention (the optional extra `peers`) on equal work: the same "
     "function, n, d and e; tests/test_peers.py checks the agreement in float64."),
)

HEADER = """# Benchmarks

The numbers and plots below come from one run of `tensorattn bench` on the machine named in the
environment table (2 CPU cores, no GPU). All ratios are computed within that run. Reproduce them from
the repository root:

```bash
pip install torch==2.13.0 && pip install -e ".[bench]"
# no GPU? the CPU wheel instead: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
{command}
python benchmarks/publish.py --from-results   # rebuild this page from latest/results.json
```

or in one step `python benchmarks/publish.py{suite_flag}`. The raw results are in
[`latest/results.json`](latest/results.json) and [`latest/results.csv`](latest/results.csv); the
method is described at the end of this page and in [`docs/benchmarks.md`](../docs/benchmarks.md).

Where things live: the suite itself and every measurement helper (timing with warm-ups and
medians, peak memory, machine load, row-fraction estimates) are in the package, under
`tensorattn/bench/`, because `tensorattn bench` runs them. This folder holds only scripts that
use those helpers and the published results (`latest/`).
{others}
"""


def _row(results: dict, spec: str, backend: str, n: int) -> dict | None:
    for r in results["rows"]:
        key = (r["spec"], r["backend"], r["n"], r["causal"], r["d"], r["status"])
        if key == (spec, backend, n, False, 8, "ok"):
            return r
    return None


def notes(results: dict) -> str:
    """Why a missed target was missed: this run's numbers, and a profile taken when the page was written."""
    out = []
    missed = [t["workload"] for t in results["targets"] if t["met"] is False]
    if any(w.startswith("triple") for w in missed):
        small, big = _row(results, "triple", "poly", 64), _row(results, "triple", "poly", 1024)
        ratios = []
        for n in (256, 512, 1024):
            p, e = _row(results, "triple", "poly", n), _row(results, "triple", "exact", n)
            if p and e:
                ratios.append(f"{e['median_s'] / p['median_s']:,.0f}× at n = {n:,}: {p['median_s'] * 1e3:.1f} ms vs "
                              f"{e['median_s'] * 1e3:,.0f} ms")
        rise = (f"from {small['median_s'] * 1e3:.1f} ms at n = 64 to {big['median_s'] * 1e3:.1f} ms at n = 1,024"
                if small and big else "little with n")
        prof = results["experiments"].get("gemm", {}).get("triple")
        where = ""
        if prof:
            where = (f" A profiled call in this run took {prof['wall_s'] * 1e3:.1f} ms: {prof['mul_calls']} small "
                     f"multiplies building the feature maps ({prof['mul_s'] * 1e3:.1f} ms), {prof['gemm_calls']} "
                     f"skinny GEMMs ({prof['gemm_s'] * 1e3:.1f} ms), and {prof['outside_ops_s'] * 1e3:.1f} ms outside "
                     "torch ops (validation, planning, Python glue).")
        out.append(
            f"**Triple, n = 1,024.** poly's time is almost all fixed per-call cost: it rises only {rise}, while "
            f"exact's grows as n³.{where} The measured ratios (" + "; ".join(ratios) + ") grow about 4× per "
            "doubling of n, so the target would be passed within a doubling of n if the trend holds (`--suite full` "
            "measures n = 2,048).")
    g = results["experiments"].get("gemm")
    if g and any(w.startswith("poly run") for w in missed):
        mul = g.get("mul_s", next((o["seconds"] for o in g["top_ops"] if o["op"] == "aten::mul"), 0.0))
        calls = g.get("gemm_calls")
        out.append(
            f"**GEMM share.** In the profiled call (n = {g['n']:,}) the GEMMs{f' ({calls} calls)' if calls else ''} "
            f"take {g['gemm_s'] * 1e3:.0f} ms and building the features (aten::mul) {mul * 1e3:.0f} ms of "
            f"{g['wall_s'] * 1e3:.0f} ms. Both are single passes over the {g['rank']} × {g['n']:,} feature matrix: "
            "one writes it, the other reads it, and with e + 1 = 9 value columns the GEMMs do ~2 flops per byte, "
            "so both are memory-bound and the GEMMs cannot take much more than half of a call. Making the GEMMs "
            "faster lowers this share.")
    return ("### Notes on the targets that were missed\n\n" + "\n\n".join(out) + "\n\n") if out else ""


def full_checks(full: dict) -> dict:
    """What a full-suite run adds to the page: its estimates checked against full measurements, and
    the larger sizes of the headline workloads."""
    checks = [dict(spec=r["spec"], backend=r["backend"], n=r["n"], estimated_s=r["median_s"],
                   measured_s=r["measured_full_s"], method=r["note"].split("(")[-1].split(" in ")[0])
              for r in full["rows"] if r.get("measured_full_s")]
    larger = []
    for spec, n in (("triple", 2048), ("pairwise", 131072)):
        poly = _row(full, spec, "poly", n)
        rival = _row(full, spec, "exact", n)
        if poly and rival:  # prefer the full measurement where the run checked its estimate
            full_s = rival.get("measured_full_s")
            larger.append(dict(spec=spec, n=n, poly_s=poly["median_s"], exact_s=full_s or rival["median_s"],
                               exact_estimated=rival["estimated"] and not full_s))
    loads = [r["load1"] for r in full["rows"] if r.get("load1") is not None]
    return dict(command=full["command"], date=full["date"], wall_s=full["wall_s"],
                commit=full["environment"].get("commit"), max_load=max(loads) if loads else None,
                cores=full["environment"].get("cores_available"), checks=checks, larger=larger,
                targets=[dict(workload=t["workload"], target=t["target"], measured=t["measured"], met=t["met"])
                         for t in full["targets"]])


def render_full(runs: list[dict]) -> str:
    lines = ["### Checks from full-suite runs\n",
             "Row-fraction estimates against the same cases measured in full, from every full-suite run "
             "published here. The machine is shared: the highest 1-minute load average seen during each run is "
             "given, and the estimates are only as steady as the timings they extrapolate.\n",
             "| run | spec | backend | n | estimated | measured in full | difference | fit |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for i, fc in enumerate(runs, 1):
        for c in fc["checks"]:
            diff = 100 * (c["estimated_s"] / c["measured_s"] - 1)
            lines.append(f"| {i} | {c['spec']} | {c['backend']} | {c['n']:,} | {c['estimated_s']:.3g} s | "
                         f"{c['measured_s']:.3g} s | {diff:+.0f}% | {c['method']} |")
    lines.append("")
    for i, fc in enumerate(runs, 1):
        load = "" if fc.get("max_load") is None else f", max load {fc['max_load']:.1f} on {fc.get('cores')} cores"
        larger = "; ".join(
            f"{x['spec']} n = {x['n']:,}: poly {x['poly_s'] * 1e3:.1f} ms vs exact "
            f"{'~' if x['exact_estimated'] else ''}{x['exact_s']:.3g} s ({x['exact_s'] / x['poly_s']:,.0f}×)"
            for x in fc["larger"])
        met = ", ".join(f"{t['workload'].split(':')[0]}: {t['measured']}" for t in fc["targets"] if t["met"] is False)
        lines.append(f"- Run {i}: `{fc['command']}`, commit {fc.get('commit')}, {fc['date']}, "
                     f"{fc['wall_s'] / 60:.0f} min{load}. Larger sizes: {larger or 'none'}. Targets missed: "
                     f"{met or 'none'}.")
    return "\n".join(lines) + "\n\n"


def other_scripts() -> str:
    """One line per other script in benchmarks/, from the first line of its docstring."""
    items = []
    for path in sorted(HERE.glob("*.py")):
        if path.name == "publish.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        items.append(f"- `{path.name}`: {doc.splitlines()[0] if doc else ''}")
    return ("Other scripts here measure single properties:\n\n" + "\n".join(items) + "\n") if items else ""


def includes() -> str:
    """The sections other scripts wrote (their section.md), each under its own heading."""
    parts = []
    for title, folder, script, intro in INCLUDES:
        path = HERE / folder / "section.md"
        if path.exists():
            parts.append(f"## {title}\n\n{intro} Written by `{script}` into [`{folder}/`]({folder}/); "
                         f"`python benchmarks/publish.py --from-results` keeps it here.\n\n{path.read_text()}")
    return "\n".join(parts)


def render(results: dict) -> str:
    suite = results["suite"]["name"]
    body = markdown(results, image_prefix="latest/")
    body = body.split("\n", 1)[1].replace("\n## ", "\n### ")  # nested under "Latest run"
    fc_path = LATEST / "full_checks.json"
    full = render_full(json.loads(fc_path.read_text())) if fc_path.exists() else ""
    body = body.replace("### Results\n", notes(results) + full + "### Results\n", 1)
    return HEADER.format(command=results["command"], suite_flag="" if suite == "default" else f" --suite {suite}",
                         others=other_scripts()) \
        + speed_targets() + f"## Latest run ({suite} suite)\n" + body + ("\n" + includes() if includes() else "")


def speed_targets() -> str:
    """The table of benchmarks/speed_targets.py (latest/speed_targets.md), when it has been run."""
    path = LATEST / "speed_targets.md"
    if not path.exists():
        return ""
    return ("## Speed targets (per-call cost, causal, FFT path, fused features)\n\n"
            "From `benchmarks/speed_targets.py`: each line is a ratio of two timings taken in one process, "
            "interleaved.\n\n" + path.read_text() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default")
    parser.add_argument("--from-results", action="store_true", help="rebuild README.md from latest/results.json")
    parser.add_argument("--full-results", nargs="+",
                        help="results.json of `--suite full` runs: their checks go on the page")
    args = parser.parse_args()
    if args.from_results:  # redraw the plots and captions from the stored results, then the page
        results = json.loads((LATEST / "results.json").read_text())
        results["figures"] = replot(results, LATEST)
        write_json(results, LATEST / "results.json")
        (LATEST / "report.md").write_text(markdown(results))
    else:
        out = LATEST.relative_to(Path.cwd()) if LATEST.is_relative_to(Path.cwd()) else LATEST
        command = f"tensorattn bench --out {out}" + ("" if args.suite == "default" else f" --suite {args.suite}")
        results = run_bench(args.suite, LATEST, command=command)
    if args.full_results:
        runs = [full_checks(json.loads(Path(path).read_text())) for path in args.full_results]
        (LATEST / "full_checks.json").write_text(json.dumps(runs, indent=1))
    (HERE / "README.md").write_text(render(results))
    print(f"wrote {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
