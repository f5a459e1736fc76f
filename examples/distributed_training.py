"""Sequence-parallel training with tensorattn on torch.distributed, checked against one process.

Run:
    torchrun --nproc_per_node=2 examples/distributed_training.py
    torchrun --nproc_per_node=2 examples/distributed_training.py --backend poly --heads 8 --scale 2 --tol 1e-2

A small causal language model (token embedding, pre-norm blocks of multi-head RoPE attention and
an MLP, a linear head) learns a copy task: every sequence repeats a random block of 8 tokens, so
after the first block the next token is the one 8 positions back, which only attention can find.
Every rank holds a contiguous shard of the positions of every sequence (rank order = position
order); the per-token layers run on the shard alone and attention is
``ta.distributed.attention(..., spec="rope", causal=True)``, which rotates with global positions
and passes gradients between ranks. The loss is the mean over all tokens of all ranks; every
parameter is replicated, so its gradient is the sum of the ranks' contributions (one all_reduce
per step), and every rank takes the same optimizer step.

Rank 0 then trains the same model from the same seed on one process with ``ta.attention`` on
whole sequences and prints both loss curves and their largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tensorattn as ta


class Block(nn.Module):
    def __init__(self, width: int, heads: int, attend: Callable):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # unit-norm q and k (QK-norm): every score lies in [-scale, scale], so the poly backend's
        # certificate (and its degree) stays fixed while the weights train
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        att = self.attend(q, k, v)  # (batch, heads, n, head dim), n = this rank's positions
        x = x + self.proj(att.transpose(1, 2).reshape(batch, n, width))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int, attend: Callable):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads, attend) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def copy_batch(step: int, batch: int, n: int, vocab: int, period: int = 8) -> torch.Tensor:
    """(batch, n + 1) tokens, a random block of ``period`` tokens repeated; the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    block = torch.randint(0, vocab, (batch, period), generator=gen)
    return block.repeat(1, n // period + 1)[:, : n + 1]


def train(*, steps: int = 50, rank: int = 0, world: int = 1, distributed: bool = False, backend: str = "exact",
          n: int = 128, batch: int = 8, vocab: int = 16, width: int = 32, heads: int = 2, layers: int = 2,
          lr: float = 1e-2, scale: float = 4.0, tol: float = 1e-3, seed: int = 0, device: str = "cpu") -> list[float]:
    """The loss of every step. ``distributed``: this rank trains on its shard of positions with
    ta.distributed.attention; otherwise one process trains on whole sequences with ta.attention."""
    options = dict(spec="rope", causal=True, backend=backend, scale=scale, tol=tol,
                   on_unbounded="ignore")  # tiny n is past tau(n); the certificate still holds
    if distributed:
        def attend(q, k, v):
            return ta.distributed.attention(q, k, v, **options)
        lo, hi = rank * n // world, (rank + 1) * n // world
    else:
        def attend(q, k, v):
            return ta.attention(q, k, v, **options)
        lo, hi = 0, n
    torch.manual_seed(seed)  # the same initial weights on every rank and on one process
    model = TinyLM(vocab, width, heads, layers, attend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        tokens = copy_batch(step, batch, n, vocab).to(device)
        inputs, targets = tokens[:, lo:hi], tokens[:, lo + 1: hi + 1]
        logits = model(inputs)
        # mean over every token of every rank: this rank's sum over the global count
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="sum") / (batch * n)
        opt.zero_grad()
        loss.backward()
        if distributed:
            # replicated weights: the gradient of the global loss is the sum of the ranks' parts
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.reshape(g.shape))
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total))
        else:
            losses.append(float(loss.detach()))
        opt.step()
    return losses


def compare(dist_losses: list[float], one_losses: list[float]) -> float:
    """Largest relative difference of two loss curves."""
    return max(abs(a - b) / abs(b) for a, b in zip(dist_losses, one_losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--backend", default="exact", choices=["exact", "poly"])
    parser.add_argument("--n", type=int, default=128, help="sequence length, all ranks together")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (width 32)")
    parser.add_argument("--scale", type=float, default=4.0, help="score scale: scores lie in [-scale, scale]")
    parser.add_argument("--tol", type=float, default=1e-3, help="poly's certified tolerance")
    parser.add_argument("--out", default=None, help="write both curves to this JSON file")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if use_cuda else "cpu"
    kw = dict(steps=args.steps, backend=args.backend, n=args.n, heads=args.heads, scale=args.scale, tol=args.tol,
              device=device)
    dist_losses = train(rank=rank, world=world, distributed=True, **kw)
    if rank == 0:
        one_losses = train(**kw)
        print(f"copy task, n={args.n}, backend={args.backend}, {world} ranks vs one process ({device})")
        print(f"{'step':>4} {'loss, ' + str(world) + ' ranks':>16} {'loss, one process':>18} {'rel. diff':>10}")
        for step, (a, b) in enumerate(zip(dist_losses, one_losses)):
            if step % 5 == 0 or step == args.steps - 1:
                print(f"{step:>4} {a:>16.7f} {b:>18.7f} {abs(a - b) / abs(b):>10.2e}")
        print(f"max relative difference over {args.steps} steps: {compare(dist_losses, one_losses):.2e}")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"distributed": dist_losses, "one_process": one_losses, "world": world,
                           "backend": args.backend, "n": args.n}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
