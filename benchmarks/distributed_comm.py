"""Sequence-parallel attention: bytes communicated per rank (forward and backward) and wall time.

    python benchmarks/distributed_comm.py                  # all parts, default sizes
    python benchmarks/distributed_comm.py --part bytes     # only the forward traffic table
    python benchmarks/distributed_comm.py --part backward  # only the backward traffic table

Part 1 (bytes): pairwise attention on the headline workload (d = e = 8, entries in [-1, 1],
scale 1/8, tol 1e-3) at n = 65,536 over 4 gloo ranks. Every rank counts the payload bytes its
collectives send and receive (``ta.distributed.count_bytes``); the table shows the busiest rank,
the mean over ranks and the prediction of ``ta.distributed.communication_bytes``.

Part 2 (backward): the traffic of the backward pass (``out.sum().backward()``) per rank, on 2
ranks, at n = 8,192 and n = 65,536. The degree is the forward plan's (``need_grad=False``: degree
4, r = 495), so the two sizes differ in n only. poly's backward all-reduces the gradients of the
r x (e+1) key statistics, so its bytes must not change with n; the exact ring's backward passes
the K/V blocks again with their dK/dV accumulators (measured at n <= ``--exact-max-n``, where the
quadratic ring is quick; the formula gives the rest).

Part 3 (time): the same workload at a smaller n, one call timed on 1 rank and on 2 ranks (each
rank one thread), next to one-process ``ta.attention`` with 1 and with 2 threads. Each figure is
the best of ``--repeats`` calls; a call's time is the slowest rank's. All ratios come from one run
on this machine; other processes on it add noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tensorattn as ta
from tensorattn.bench.measure import best_of

D = 8
SCALE = 1 / D


def _inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(rng.uniform(-1, 1, (1, n, D)).astype(np.float32)) for _ in range(3))


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = x.shape[1]
    return x[:, rank * n // world: (rank + 1) * n // world]


def _bytes_worker(rank: int, world: int, n: int, out_path: str) -> None:
    q, k, v = (_shard(t, rank, world) for t in _inputs(n))
    rows = []
    for backend in ("poly", "exact"):
        for causal in (False, True):
            with ta.distributed.count_bytes() as log:
                t0 = time.perf_counter()
                _, info = ta.distributed.attention(q, k, v, backend=backend, causal=causal, scale=SCALE,
                                                   return_info=True)
                seconds = time.perf_counter() - t0
            mine = torch.tensor([log.received, log.sent, seconds], dtype=torch.float64)
            every = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            itemsize = 8 if info.feature_dtype == "float64" else 4
            predicted = ta.distributed.communication_bytes(
                backend, n=n, ranks=world, d=D, e=D, rank=info.rank, causal=causal, itemsize=itemsize)
            rows.append(dict(
                backend=backend, causal=causal, degree=info.degree, rank=info.rank,
                feature_dtype=info.feature_dtype, received=[int(t[0]) for t in every],
                sent=[int(t[1]) for t in every], seconds=max(float(t[2]) for t in every),
                predicted=predicted, by_op=log.received_by_op,
            ))
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)


def _backward_worker(rank: int, world: int, ns: list[int], exact_max_n: int, out_path: str) -> None:
    rows = []
    for n in ns:
        shards = [_shard(t, rank, world).requires_grad_(True) for t in _inputs(n)]
        for backend in ("poly", "exact"):
            if backend == "exact" and n > exact_max_n:
                continue
            for causal in (False, True):
                with ta.distributed.count_bytes() as forward:
                    out, info = ta.distributed.attention(*shards, backend=backend, causal=causal, scale=SCALE,
                                                         need_grad=False, return_info=True)
                with ta.distributed.count_bytes() as backward:
                    out.sum().backward()
                mine = torch.tensor([forward.received, backward.received], dtype=torch.float64)
                every = [torch.zeros_like(mine) for _ in range(world)]
                dist.all_gather(every, mine)
                itemsize = 8 if info.feature_dtype == "float64" else 4
                predicted = ta.distributed.communication_bytes(
                    backend, n=n, ranks=world, d=D, e=D, rank=info.rank, causal=causal, itemsize=itemsize,
                    backward=True)
                rows.append(dict(n=n, backend=backend, causal=causal, degree=info.degree, rank=info.rank,
                                 forward=[int(t[0]) for t in every], backward=[int(t[1]) for t in every],
                                 by_op=backward.received_by_op, predicted=predicted))
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(rows, fh)


def _time_worker(rank: int, world: int, n: int, repeats: int, backends: list[str], out_path: str) -> None:
    q, k, v = (_shard(t, rank, world) for t in _inputs(n))
    result = {}
    for backend in backends:
        for causal in (False, True):
            best = float("inf")
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                ta.distributed.attention(q, k, v, backend=backend, causal=causal, scale=SCALE)
                took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                best = min(best, float(took))
            result[f"{backend} causal={causal}"] = best
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(result, fh)


def _entry(rank: int, world: int, init_file: str, threads: int, worker, args) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _run_world(world: int, worker, *args, threads: int = 1):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_entry, args=(world, os.path.join(tmp, "rendezvous"), threads, worker, (*args, out)),
                 nprocs=world, join=True)
        with open(out) as fh:
            return json.load(fh)


def _one_process(n: int, repeats: int, backends: list[str], threads: int) -> dict:
    torch.set_num_threads(threads)
    q, k, v = _inputs(n)
    result = {}
    for backend in backends:
        for causal in (False, True):
            call = functools.partial(ta.attention, q, k, v, backend=backend, causal=causal, scale=SCALE)
            result[f"{backend} causal={causal}"], _ = best_of(call, repeats)
    return result


def bytes_table(n: int, world: int) -> str:
    rows = _run_world(world, _bytes_worker, n)
    lines = [
        f"Bytes per rank, pairwise n={n:,}, d=e={D}, {world} gloo ranks (payload; see CommLog):",
        "",
        "| backend | causal | degree / rank | busiest rank received | mean received | predicted (busiest) "
        "| of which handshake + plan | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        overhead = r["by_op"].get("handshake", 0) + r["by_op"].get("plan_maxima", 0)
        deg = f"{r['degree']} / {r['rank']:,} ({r['feature_dtype']})" if r["degree"] is not None else "-"
        lines.append(
            f"| {r['backend']} | {r['causal']} | {deg} | {max(r['received']):,} | "
            f"{int(np.mean(r['received'])):,} | {r['predicted']:,} | {overhead:,} (rank 0) | {r['seconds']:.2f} |"
        )
    by = {(r["backend"], r["causal"]): max(r["received"]) for r in rows}
    lines += ["", "exact-ring / poly bytes (busiest rank): "
              f"non-causal {by[('exact', False)] / by[('poly', False)]:.1f}x, "
              f"causal {by[('exact', True)] / by[('poly', True)]:.1f}x"]
    return "\n".join(lines)


def backward_table(ns: list[int], world: int, exact_max_n: int) -> str:
    rows = _run_world(world, _backward_worker, ns, exact_max_n)
    lines = [
        f"Backward-pass bytes per rank, pairwise d=e={D}, {world} gloo ranks (payload; forward for comparison):",
        "",
        "| n | backend | causal | degree / rank | backward: busiest rank received | by op (rank 0) "
        "| predicted (busiest) | forward: busiest rank received |",
        "|---:|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        deg = f"{r['degree']} / {r['rank']:,}" if r["degree"] is not None else "-"
        ops = ", ".join(f"{k} {v:,}" for k, v in r["by_op"].items())
        lines.append(f"| {r['n']:,} | {r['backend']} | {r['causal']} | {deg} | {max(r['backward']):,} | {ops} | "
                     f"{r['predicted']:,} | {max(r['forward']):,} |")
    poly = {}
    for r in rows:
        if r["backend"] == "poly":
            poly.setdefault(r["causal"], []).append(max(r["backward"]))
    lines += ["", "poly backward bytes at " + " vs ".join(f"n={n:,}" for n in ns) + ": " + "; ".join(
        f"causal={c}: {' vs '.join(f'{b:,}' for b in bs)} ({'equal' if len(set(bs)) == 1 else 'DIFFERENT'})"
        for c, bs in poly.items())]
    return "\n".join(lines)


def time_table(n: int, repeats: int, backends: list[str]) -> str:
    one_1t = _one_process(n, repeats, backends, threads=1)
    one_2t = _one_process(n, repeats, backends, threads=2)
    world1 = _run_world(1, _time_worker, n, repeats, backends)
    world2 = _run_world(2, _time_worker, n, repeats, backends)
    lines = [
        f"Wall time, pairwise n={n:,}, d=e={D}, best of {repeats} (seconds; this machine has "
        f"{os.cpu_count()} cores):",
        "",
        "| call | ta.attention 1 thread | ta.attention 2 threads | distributed 1 rank | distributed 2 ranks "
        "| 1 rank / 2 ranks | 2 threads / 2 ranks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in world1:
        lines.append(
            f"| {key} | {one_1t[key]:.3f} | {one_2t[key]:.3f} | {world1[key]:.3f} | {world2[key]:.3f} | "
            f"{world1[key] / world2[key]:.2f}x | {one_2t[key] / world2[key]:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["bytes", "backward", "time", "all"], default="all")
    parser.add_argument("--n-bytes", type=int, default=65536, help="n of the traffic table")
    parser.add_argument("--ranks", type=int, default=4, help="ranks of the traffic table")
    parser.add_argument("--n-backward", default="8192,65536", help="sizes of the backward table")
    parser.add_argument("--exact-max-n", type=int, default=8192, help="largest n of the exact ring's backward")
    parser.add_argument("--n-time", type=int, default=16384, help="n of the timing table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="exact,poly")
    args = parser.parse_args()
    if args.part in ("bytes", "all"):
        print(bytes_table(args.n_bytes, args.ranks), flush=True)
        print()
    if args.part in ("backward", "all"):
        ns = [int(x) for x in args.n_backward.split(",")]
        print(backward_table(ns, 2, args.exact_max_n), flush=True)
        print()
    if args.part in ("time", "all"):
        print(time_table(args.n_time, args.repeats, args.backends.split(",")), flush=True)


if __name__ == "__main__":
    main()
