"""Peak memory of exact attention training per rank: 2-rank ring vs one process.

Run:  python benchmarks/distributed_memory.py [--quick] [--n 32768] [--d 32] [--budget-kib 512]

Pairwise exact attention, forward + backward (``out.sum().backward()``), float32, inputs in
[-1, 1]. One process runs ``ta.attention`` on the whole sequence; two gloo ranks run
``ta.distributed.attention`` on their halves (each rank one thread). Each runs in a fresh process,
warms up on a tiny call, and then measures, with ``bench.measure.PeakMemory`` (VmHWM after
clear_refs), the peak resident memory added by creating its inputs, the forward and the backward.
The ring backward keeps O(shard) state per rank (its shards, output, log-sum-exp and gradients)
plus the K/V pieces and dK/dV accumulators in flight (each piece at most memory_budget / 8), and
recomputes tiles like the one-process backward. Both sides use the same tile budget
(``memory_budget``), whose working memory is a fixed cost per process: the ratio reaches 1/2 only
where the O(n) state outweighs it, which is why the default sizes pick a small budget and d = 32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tensorattn as ta
from tensorattn.bench.measure import PeakMemory


def _leaves(n: int, d: int, heads: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(heads, n, d, generator=gen).mul_(2).sub_(1).requires_grad_(True) for _ in range(3)]


def _measure(call, n: int, d: int, heads: int, seed: int) -> dict:
    """Peak memory and seconds of: make this process's inputs, forward, backward."""
    with PeakMemory() as peak:
        q, k, v = _leaves(n, d, heads, seed)
        t0 = time.perf_counter()
        out = call(q, k, v)
        out.sum().backward()
        seconds = time.perf_counter() - t0
    return {"peak_mib": None if peak.peak_bytes is None else peak.peak_bytes / 2**20,
            "inputs_mib": 3 * heads * n * d * 4 / 2**20, "seconds": seconds,
            "finite": bool(torch.isfinite(q.grad).all())}


def single(n: int, d: int, heads: int, budget: int, causal: bool) -> dict:
    torch.set_num_threads(1)
    call = lambda q, k, v: ta.attention(q, k, v, backend="exact", causal=causal, memory_budget=budget)  # noqa: E731
    call(*_leaves(64, d, heads, 1)).sum().backward()  # warm up imports and caches
    return _measure(call, n, d, heads, 0)


def _rank(rank: int, world: int, init_file: str, n: int, d: int, heads: int, budget: int, causal: bool,
          out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=60))
    try:
        call = lambda q, k, v: ta.distributed.attention(  # noqa: E731
            q, k, v, backend="exact", causal=causal, memory_budget=budget)
        call(*_leaves(64, d, heads, 1)).sum().backward()
        dist.barrier()
        lo, hi = rank * n // world, (rank + 1) * n // world
        res = _measure(call, hi - lo, d, heads, rank)
        every = [None] * world
        dist.all_gather_object(every, res)
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(every, fh)
    finally:
        dist.destroy_process_group()


def world(ranks: int, n: int, d: int, heads: int, budget: int, causal: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank, args=(ranks, os.path.join(tmp, "rendezvous"), n, d, heads, budget, causal, out),
                 nprocs=ranks, join=True)
        with open(out) as fh:
            return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 8192")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=32, help="head dim (= value dim)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--budget-kib", type=int, default=512, help="memory_budget of both sides, KiB")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--child", choices=["single", "world"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = 8192 if args.quick else args.n
    budget = args.budget_kib << 10
    if args.child == "single":
        print(json.dumps(single(n, args.d, args.heads, budget, args.causal)))
        return
    if args.child == "world":
        print(json.dumps(world(args.ranks, n, args.d, args.heads, budget, args.causal)))
        return
    rows = {}
    for child in ("single", "world"):  # each in a fresh interpreter
        cmd = [sys.executable, __file__, "--child", child, "--n", str(n), "--d", str(args.d), "--heads",
               str(args.heads), "--budget-kib", str(args.budget_kib), "--ranks", str(args.ranks)]
        cmd += ["--causal"] if args.causal else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[child] = json.loads(res.stdout.strip().splitlines()[-1])
        print(child, json.dumps(rows[child]), flush=True)
    one, ranks = rows["single"], rows["world"]
    busiest = max(ranks, key=lambda r: r["peak_mib"])
    print(f"\nExact attention, forward + backward, n={n:,}, d=e={args.d}, heads={args.heads}, float32, "
          f"causal={args.causal}, memory_budget={args.budget_kib} KiB (peak memory added, inputs included):\n")
    print("| run | peak MiB (busiest rank) | of which inputs | seconds (slowest) |")
    print("|---|---:|---:|---:|")
    print(f"| one process | {one['peak_mib']:.1f} | {one['inputs_mib']:.1f} | {one['seconds']:.1f} |")
    print(f"| {args.ranks} ranks (ring) | {busiest['peak_mib']:.1f} | {busiest['inputs_mib']:.1f} | "
          f"{max(r['seconds'] for r in ranks):.1f} |")
    print(f"\nper-rank peak / one-process peak = {busiest['peak_mib'] / one['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
