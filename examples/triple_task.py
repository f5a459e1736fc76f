"""A task that needs triple-wise attention: does some pair j, k satisfy x_j + x_k = x_i (mod p)?

Each sequence holds n tokens x_1..x_n drawn uniformly from 1..p-1; the label of position i is 1 when
some pair (j, k) of positions (j = k allowed; x = 0 never occurs, so j = i or k = i never match) has
x_j + x_k = x_i mod p. With n = 8 and p = 41 about half of the labels are 1. This is the Match3
task of Sanford, Hsu & Telgarsky (*Representational Strengths and Limitations of Transformers*,
2023): one layer of pairwise attention needs a large width to solve it, while one triple-wise
(2-simplicial) layer can score every pair (j, k) against i directly.

Every model is the same tiny network: token embedding -> one ta.nn.MultiheadTensorAttention layer
-> MLP on [embedding, attention output] -> one logit per position, trained with AdamW on fresh
random batches (so there is no overfitting) and evaluated on a fixed held-out set. Models:

* pairwise, exact                          softmax attention
* triple, exact                            2-simplicial attention, unbounded query/key norms
* triple, exact, qk_norm=rho               the same with queries/keys of norm rho (bounded entries)
* triple, poly, qk_norm=rho                the certified polynomial backend on the bounded model

The polynomial method needs bounded scores (Alman & Song): qk_norm=rho caps the score radius at
beta <= rho^3 / sqrt(head_dim), so the degree and rank stay fixed while the weights train. The poly
model is trained with need_grad=False: it trains the surrogate itself, whose autograd gradients are
exact for the surrogate, so the degree is chosen for the forward tolerance only. At the end it is
also evaluated with the exact backend (same weights) to show the surrogate and the exact model agree.

Run:  python examples/triple_task.py            (about 5 minutes on 2 CPU cores)
      python examples/triple_task.py --quick    (a few seconds; a smoke test)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

import tensorattn as ta


def make_batch(size: int, n: int, p: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (size, n) in 1..p-1 and labels (size, n): 1 where some x_j + x_k = x_i (mod p)."""
    x = torch.randint(1, p, (size, n), generator=generator)
    pair_sums = (x[:, :, None] + x[:, None, :]) % p  # (size, j, k)
    labels = (pair_sums[:, None] == x[:, :, None, None]).flatten(2).any(-1)
    return x, labels.float()


class TinyModel(nn.Module):
    """Embedding -> one attention layer -> MLP on [embedding, attention output] -> logit."""

    def __init__(self, p: int, embed: int, heads: int, spec: str, backend: str, **attn_options):
        super().__init__()
        self.embed = nn.Embedding(p, embed)
        self.attn = ta.nn.MultiheadTensorAttention(embed, heads, spec, backend=backend, **attn_options)
        self.head = nn.Sequential(nn.LayerNorm(2 * embed), nn.Linear(2 * embed, 64), nn.GELU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h)
        return self.head(torch.cat([h, a], dim=-1)).squeeze(-1)


@dataclass
class Result:
    name: str
    steps: list[int]
    accuracy: list[float]
    seconds: float
    final: float
    info: ta.AttentionInfo
    exact_eval: float | None = None


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    hits = sum(((model(x[i: i + chunk]) > 0).float() == y[i: i + chunk]).sum().item() for i in range(0, len(x), chunk))
    return hits / y.numel()


def train(name: str, args, spec: str, backend: str, test: tuple, **attn_options) -> Result:
    torch.manual_seed(args.seed)
    model = TinyModel(args.p, args.embed, args.heads, spec, backend, **attn_options)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(args.seed + 1)
    steps, accs, train_time = [], [], 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x, y = make_batch(args.batch, args.n, args.p, data)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            steps.append(step)
            accs.append(accuracy(model, *test))
            print(f"  {name:<28} step {step:>5}  loss {loss.item():.3f}  held-out accuracy {accs[-1]:.3f}", flush=True)
    with torch.no_grad():
        _, info = model.attn(model.embed(test[0][: args.batch]), return_info=True)
    result = Result(name, steps, accs, train_time, accs[-1], info)
    if backend == "poly":  # the same weights with exact attention
        model.attn.backend = "exact"
        result.exact_eval = accuracy(model, *test)
    return result


def table(results: list[Result], args) -> str:
    rows = [
        "| model | held-out accuracy | train time (s) | ms / step | beta | degree | rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc = f"{r.final:.3f}" + (f" (exact attention on the same weights: {r.exact_eval:.3f})" if r.exact_eval else "")
        deg = "-" if r.info.degree is None else str(r.info.degree)
        rank = "-" if r.info.rank is None else f"{r.info.rank:,}"
        rows.append(f"| {r.name} | {acc} | {r.seconds:.1f} | {1000 * r.seconds / args.steps:.1f} | "
                    f"{r.info.beta:.2f} | {deg} | {rank} |")
    return "\n".join(rows)


def plot(results: list[Result], path: str, baseline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        style = "--" if "poly" in r.name else "-"  # poly and exact on the same model overlap
        ax.plot(r.steps, r.accuracy, style, label=r.name, marker="o" if len(r.steps) < 30 else None, markersize=3)
    ax.axhline(baseline, color="gray", linestyle=":", label="majority class")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("x_j + x_k = x_i (mod p): pairwise vs triple-wise attention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="sequence length")
    ap.add_argument("--p", type=int, default=41, help="modulus")
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--test-size", type=int, default=4096)
    ap.add_argument("--rho", type=float, default=1.6, help="qk_norm radius of the bounded models")
    ap.add_argument("--tol", type=float, default=0.05, help="poly tolerance (certified, relative to max|v|)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="triple_task.png", help="learning-curve plot (PNG)")
    ap.add_argument("--quick", action="store_true", help="a few steps on small batches (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.eval_every, args.test_size = 12, 32, 6, 256
    return args


def main(argv=None) -> list[Result]:
    args = parse(argv)
    test = make_batch(args.test_size, args.n, args.p, torch.Generator().manual_seed(10_000 + args.seed))
    majority = max(test[1].mean().item(), 1 - test[1].mean().item())
    print(f"n={args.n}, p={args.p}: {test[1].mean().item():.3f} of held-out labels are 1 "
          f"(majority-class accuracy {majority:.3f})")
    bounded = dict(qk_norm=args.rho)
    poly = dict(qk_norm=args.rho, tol=args.tol, on_unbounded="ignore", need_grad=False)
    results = [
        train("pairwise, exact", args, "pairwise", "exact", test),
        train("triple, exact", args, "triple", "exact", test),
        train(f"triple, exact, qk_norm={args.rho:g}", args, "triple", "exact", test, **bounded),
        train(f"triple, poly, qk_norm={args.rho:g}", args, "triple", "poly", test, **poly),
    ]
    print()
    print(table(results, args))
    plot(results, args.out, majority)
    print(f"\nlearning curves saved to {args.out}")
    return results


if __name__ == "__main__":
    main()
