"""Sequence-parallel attention with tensorattn on torch.distributed.

Run:
    torchrun --nproc_per_node=2 examples/distributed_attention.py
    torchrun --nproc_per_node=4 examples/distributed_attention.py --spec triple

Every rank builds the same inputs from one seed (a stand-in for the rank's part of a real model),
keeps its contiguous shard of positions (rank order = position order), and calls
``ta.distributed.attention``. To show that the answer is the one-process answer, each rank also
runs ``ta.attention`` on the full inputs and compares its rows; rank 0 prints the largest
difference over all ranks next to the certified error bound and the bytes each call exchanged.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import tensorattn as ta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help="sequence length, all ranks together (default 4096; 512 for triple)")
    parser.add_argument("--d", type=int, default=8, help="head dim")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--spec", default="pairwise", choices=["pairwise", "rope", "triple"])
    args = parser.parse_args()
    if args.n is None:
        args.n = 512 if args.spec == "triple" else 4096

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    gen = torch.Generator().manual_seed(0)
    draw = lambda: (torch.rand(args.heads, args.n, args.d, generator=gen) * 2 - 1).to(device)  # noqa: E731
    nk = 2 if args.spec == "triple" else 1
    q = draw()
    ks = [draw() for _ in range(nk)]
    vs = [draw() for _ in range(nk)]
    k, v = (ks[0], vs[0]) if nk == 1 else (tuple(ks), tuple(vs))

    # this rank's contiguous shard of positions
    lo, hi = rank * args.n // world, (rank + 1) * args.n // world
    shard = lambda x: tuple(t[:, lo:hi] for t in x) if isinstance(x, tuple) else x[:, lo:hi]  # noqa: E731

    if rank == 0:
        print(f"{args.spec}: n={args.n} d={args.d} heads={args.heads} over {world} ranks ({device.type})")
        print(f"{'backend':8} {'causal':6} {'degree':>6} {'max|dist - one process|':>24} "
              f"{'error_bound':>11} {'bytes received by rank 0':>25}")
    for backend in ("exact", "poly"):
        for causal in (False, True):
            kw = dict(spec=args.spec, backend=backend, causal=causal, scale=1 / args.d)
            with ta.distributed.count_bytes() as log:
                out, info = ta.distributed.attention(shard(q), shard(k), shard(v), return_info=True, **kw)
            one_process = ta.attention(q, k, v, **kw)[:, lo:hi]
            err = (out - one_process).abs().max().to(torch.float64)
            dist.all_reduce(err, op=dist.ReduceOp.MAX)  # the largest difference over all ranks
            if rank == 0:
                print(f"{backend:8} {causal!s:6} {info.degree or '-':>6} {float(err):>24.3e} "
                      f"{info.error_bound:>11.3e} {log.received:>25,}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
