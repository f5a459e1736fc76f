"""Run a benchmark suite into benchmarks/latest/ and rewrite benchmarks/README.md from its results.

    python benchmarks/publish.py                 # default suite (< 3 min on 2 cores)
    python benchmarks/publish.py --suite full    # the larger sweeps
    python benchmarks/publish.py --from-results  # only rebuild README.md from latest/results.json

The README holds the DESIGN section 7 targets next to the measured ratios, the tables and the plots
of the latest run, and the command that reproduces them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorattn.bench import run_bench
from tensorattn.bench.report import markdown

HERE = Path(__file__).resolve().parent
LATEST = HERE / "latest"

HEADER = """# Benchmarks

The numbers and plots below come from one run of `tensorattn bench` on the machine named in the
environment table (2 CPU cores, no GPU). All ratios are computed within that run. Reproduce them from
the repository root:

```bash
pip install torch==2.13.0 && pip install -e ".[bench]"
{command}
python benchmarks/publish.py --from-results   # rebuild this page from latest/results.json
```

or in one step `python benchmarks/publish.py{suite_flag}`. The raw results are in
[`latest/results.json`](latest/results.json) and [`latest/results.csv`](latest/results.csv); the
method is described at the end of this page and in [`docs/benchmarks.md`](../docs/benchmarks.md).
Other scripts here measure single properties: `exact_memory.py` (peak memory of exact attention),
`relative_scaling.py` (relative-position backend), `distributed_comm.py` (communication volume).

"""


def render(results: dict) -> str:
    suite = results["suite"]["name"]
    body = markdown(results, image_prefix="latest/")
    body = body.split("\n", 1)[1].replace("\n## ", "\n### ")  # nested under "Latest run"
    return HEADER.format(command=results["command"], suite_flag="" if suite == "default" else f" --suite {suite}") \
        + f"## Latest run ({suite} suite)\n" + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default")
    parser.add_argument("--from-results", action="store_true", help="rebuild README.md from latest/results.json")
    args = parser.parse_args()
    if args.from_results:
        results = json.loads((LATEST / "results.json").read_text())
    else:
        out = LATEST.relative_to(Path.cwd()) if LATEST.is_relative_to(Path.cwd()) else LATEST
        command = f"tensorattn bench --out {out}" + ("" if args.suite == "default" else f" --suite {args.suite}")
        results = run_bench(args.suite, LATEST, command=command)
    (HERE / "README.md").write_text(render(results))
    print(f"wrote {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
