"""Function composition and Match3: pairwise, triple, Strassen and tree attention, one layer each.

Two synthetic tasks that one layer of softmax attention provably cannot solve at small width
(Peng et al. 2024; Sanford, Hsu & Telgarsky 2023; Kozachinskiy et al. 2025), and that attention
polynomials can (Chakrabarti, Pitassi & Alman, *Poly-attention*, 2026):

* compose (2-fold function composition). Three disjoint alphabets X, Y, Z of m symbols each
  (persons, cities, countries). Two random bijections f: X -> Y and g: Y -> Z are written as pair
  tokens: m tokens (x, f(x)), one for every x in X, and m tokens (y, g(y)), one for every y in Y.
  Then come query tokens (x*), by default one for every x in X in random order; the target of
  query x* is g(f(x*)) (m classes). A token's embedding is E[left] + E[right] + K[kind]: one symbol
  table E for all 3m symbols, so a city has the same vector as the output of f and as the input
  of g; kind = f-pair, g-pair or query; a query's right symbol is a blank. There are no positional
  embeddings (the order of the tokens carries no information), and each query attends over the
  2m pair tokens only, so the queries of one sequence are independent examples that share f and
  g. Tree attention on the path i-j-k solves it with h = <q_i, k1_j> + <k1_j, k2_k>: the first
  edge matches the query x* to the pair (x*, f(x*)), the second matches that pair's f(x*) to the
  pair (f(x*), g(f(x*))), whose value carries g(f(x*)); `hand_set` writes such weights, and with
  them tree, Strassen and triple models score 1.0 without training. One pairwise layer cannot do
  this: a query's scores depend on x* alone, so what it reads from the g-pairs cannot depend on
  f(x*); it can only store a summary of all of g, which takes width growing with m (Peng et al.).
  f and g are bijections so that g's histogram is uniform: with arbitrary functions, guessing the
  most frequent value of g (no composition at all) scores about 0.4 at m = 8.
* match3. n tokens p_1..p_n drawn uniformly from Z_M; the label of position i is 1 when some
  j, k in 1..n (any positions: j = k, j = i and k = i allowed) have p_i + p_j + p_k = 0 (mod M)
  (Sanford et al.'s Match3). With n = 8 and M = 53 about half of the labels are 1.

Every model is the same network: embedding -> one ta.nn.MultiheadTensorAttention layer (same
embed_dim and num_heads for every mechanism, backend="exact") -> MLP on [embedding, attention
output] -> logits; for match3 every position attends to every position. The order-3 mechanisms
have two key and two value projections, pairwise one of each; the pairwise model's MLP hidden
layer is widened so that its total parameter count matches the others' (the table lists the
counts). Training: AdamW on fresh random batches (no example is seen twice), a fixed held-out
set; every run is deterministic given its seed (torch.manual_seed for the weights, numpy
Generators for the data, one torch thread).

The setup, the results and what they say are in
docs/poly-attention.md#experiment-composition-and-match3-with-one-layer.

Run:  python examples/composition.py                  (4 mechanisms x 2 tasks x 3 seeds; about
                                                       17 minutes on a shared 2-core machine)
      python examples/composition.py --task compose --seeds 0 1
      python examples/composition.py --quick          (a few seconds; a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import tensorattn as ta

MECHANISMS = ("pairwise", "triple", "strassen", "tree")
TASKS = ("compose", "match3")
KIND_F, KIND_G, KIND_QUERY = 0, 1, 2


# --- data -------------------------------------------------------------------------------------


def make_compose(size: int, m: int, queries: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (size, 2m + queries, 3) of (kind, left symbol, right symbol); targets (size, queries).

    Symbols: X = 0..m-1, Y = m..2m-1, Z = 2m..3m-1, blank = 3m. f and g are uniformly random
    bijections; the queries are distinct x in random order, with targets g(f(x)) in 0..m-1 (z - 2m).
    """
    ar = np.broadcast_to(np.arange(m), (size, m))
    f = rng.permuted(ar, axis=1)  # f[x] = index of f(x) in Y
    g = rng.permuted(ar, axis=1)  # g[y] = index of g(y) in Z
    x_star = rng.permuted(ar, axis=1)[:, :queries]
    tokens = np.zeros((size, 2 * m + queries, 3), dtype=np.int64)
    tokens[:, :m] = np.stack([np.full((size, m), KIND_F), ar, m + f], axis=-1)
    tokens[:, m: 2 * m] = np.stack([np.full((size, m), KIND_G), m + ar, 2 * m + g], axis=-1)
    tokens[:, 2 * m:] = np.stack([np.full_like(x_star, KIND_QUERY), x_star, np.full_like(x_star, 3 * m)], axis=-1)
    rows = np.arange(size)[:, None]
    return torch.from_numpy(tokens), torch.from_numpy(g[rows, f[rows, x_star]])


def make_match3(size: int, n: int, M: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (size, n) in Z_M and labels (size, n): 1 where some p_i + p_j + p_k = 0 (mod M)."""
    p = rng.integers(0, M, (size, n))
    sums = (p[:, :, None, None] + p[:, None, :, None] + p[:, None, None, :]) % M  # (size, i, j, k)
    labels = (sums == 0).reshape(size, n, n * n).any(-1)
    return torch.from_numpy(p), torch.from_numpy(labels).float()


def make_batch(task: str, size: int, args, rng: np.random.Generator):
    if task == "compose":
        return make_compose(size, args.m, args.queries, rng)
    return make_match3(size, args.n, args.M, rng)


def repeated_index_triple(p: torch.Tensor, M: int) -> torch.Tensor:
    """match3: positions i with a matching triple that repeats an index (j = k, j = i or k = i),
    i.e. some j with p_i + 2 p_j = 0 or 2 p_i + p_j = 0 (mod M). These are pairwise relations, which
    one pairwise attention layer can check; only triples of three distinct positions need more."""
    one_two = (p[:, :, None] + 2 * p[:, None, :]) % M == 0
    two_one = (2 * p[:, :, None] + p[:, None, :]) % M == 0
    return (one_two | two_one).any(-1)


def hard_positions(task: str, test: tuple[torch.Tensor, torch.Tensor], args) -> torch.Tensor | None:
    """match3: the held-out positions where no repeated-index triple decides the label."""
    return ~repeated_index_triple(test[0], args.M) if task == "match3" else None


def chance_levels(task: str, test, args) -> dict[str, tuple[float, float | None]]:
    """Reference accuracies (overall, on the hard positions) reached without solving the task."""
    if task == "compose":
        return {"chance (1/m)": (1 / args.m, None)}
    labels, hard = test[1].bool(), hard_positions(task, test, args)
    majority = labels.float().mean().item() >= 0.5
    shortcut = repeated_index_triple(test[0], args.M)  # always right off the hard positions

    def acc(pred: torch.Tensor) -> tuple[float, float]:
        hits = pred == labels
        return hits.float().mean().item(), hits[hard].float().mean().item()

    return {"majority class": acc(torch.full_like(labels, majority)),
            "repeated-index triples only (pairwise-checkable)": acc(shortcut)}


# --- model ------------------------------------------------------------------------------------


class OneLayer(nn.Module):
    """Embedding -> one attention layer -> MLP on [embedding, attention output] -> logits."""

    def __init__(self, task: str, spec: str, args, hidden: int):
        super().__init__()
        self.task = task
        E = args.embed
        if task == "compose":
            self.symbols = nn.Embedding(3 * args.m + 1, E)
            self.kinds = nn.Embedding(3, E)
            outputs = self.m = args.m
        else:
            self.symbols = nn.Embedding(args.M, E)
            outputs = 1
        self.attn = ta.nn.MultiheadTensorAttention(E, args.heads, spec, backend="exact")
        self.head = nn.Sequential(nn.LayerNorm(2 * E), nn.Linear(2 * E, hidden), nn.GELU(), nn.Linear(hidden, outputs))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.task == "compose":
            keys = self.kinds(tokens[..., 0]) + self.symbols(tokens[..., 1]) + self.symbols(tokens[..., 2])
            keys, query = keys[:, : 2 * self.m], keys[:, 2 * self.m:]  # queries attend to the pairs only
        else:
            query = keys = self.symbols(tokens)
        a, _ = self.attn(query, keys, keys)
        out = self.head(torch.cat([query, a], dim=-1))
        return out if self.task == "compose" else out.squeeze(-1)


def head_params(E: int, hidden: int, outputs: int) -> int:
    return 4 * E + (2 * E + 1) * hidden + (hidden + 1) * outputs


def hidden_sizes(args, outputs: int) -> dict[str, int]:
    """MLP hidden width per mechanism: the pairwise model gets the extra key and value projection
    of the order-3 models (2 * (E^2 + E) parameters) as MLP hidden units instead."""
    E, base = args.embed, args.hidden
    target = head_params(E, base, outputs) + 2 * (E * E + E)
    wide = min(range(base, base + 4 * E * E), key=lambda h: abs(head_params(E, h, outputs) - target))
    return {spec: wide if spec == "pairwise" else base for spec in MECHANISMS}


@torch.no_grad()
def hand_set(model: OneLayer, m: int, sharpness: float = 4.0, penalty: float = 20.0) -> OneLayer:
    """Write weights that solve compose exactly into a tree (or Strassen) model: the solution
    the mechanism admits, found without training.

    Embedding: x in X and y in Y as their ceil(log2 m) bits in +-1 (b dims each), z in Z one-hot,
    the kind one-hot. Head 0: q = a*bits(x*); k1 = a*[bits of the X symbol, bits of the Y symbol]
    and a kind penalty against the query; k2 = a*bits(Y symbol) and +-penalty by kind (g-pairs
    up). So <q, k1_j> is largest for the pair (x*, f(x*)) and <k1_j, k2_k> for the g-pair whose y
    is j's Y symbol. v1 = 1, v2 = one-hot(z); the MLP reads head 0's m outputs. The third
    Strassen term <k2_k, q_i> is 0 (q and k2 use disjoint coordinates), so Strassen shares it.
    Triple (sum_l q_l k1_l k2_l) gets the same two terms from constant coordinates: k2 = 1 where
    q and k1 meet, q = 1 where k1 and k2 meet."""
    attn, E = model.attn, model.symbols.embedding_dim
    if attn.spec.name not in ("tree", "strassen", "triple"):
        raise ValueError(f"no hand-set solution for spec {attn.spec.name!r}")
    b, hd = max(1, (m - 1).bit_length()), attn.head_dim
    kinds = 2 * b + m  # first kind coordinate of the embedding
    if kinds + 3 > E or max(2 * b + 2, m) > hd:
        raise ValueError(f"hand_set needs embed >= {kinds + 3} and head_dim >= {max(2 * b + 2, m)}")
    for p in model.parameters():
        p.zero_()
    bits = torch.tensor([[1.0 if (s >> t) & 1 else -1.0 for t in range(b)] for s in range(m)])
    model.symbols.weight[:m, :b] = bits  # X
    model.symbols.weight[m: 2 * m, b: 2 * b] = bits  # Y
    model.symbols.weight[2 * m: 3 * m, 2 * b: 2 * b + m] = torch.eye(m)  # Z
    model.kinds.weight[:, kinds: kinds + 3] = torch.eye(3)
    a, mu = sharpness, penalty
    q, k1, k2 = attn.q_proj, attn.k_proj[0], attn.k_proj[1]
    x_bits, y_bits = range(b), range(b, 2 * b)
    for i in x_bits:
        q.weight[i, i] = a
        k1.weight[i, i] = a
    for i in y_bits:
        k1.weight[i, i] = a
        k2.weight[i, i] = a
    k1.bias[2 * b] = 1.0  # meets k2's kind coordinate: +mu for a g-pair, -mu otherwise
    k2.weight[2 * b, kinds: kinds + 3] = torch.tensor([-mu, mu, -mu])
    q.bias[2 * b + 1] = 1.0  # meets k1's kind coordinate: -mu unless j is an f-pair
    k1.weight[2 * b + 1, kinds + 1: kinds + 3] = -mu
    if attn.spec.name == "triple":
        for i in x_bits:
            k2.bias[i] = 1.0
        for i in (*y_bits, 2 * b):
            q.bias[i] = 1.0
        k2.bias[2 * b + 1] = 1.0
    attn.v_proj[0].bias[:hd] = 1.0
    attn.v_proj[1].weight[:m, 2 * b: 2 * b + m] = torch.eye(m)
    attn.out_proj.weight[:m, :m] = torch.eye(m)
    # MLP: LayerNorm keeps the order of head 0's outputs; +10 keeps GELU in its linear part
    ln, lin1, _, lin2 = model.head
    ln.weight.fill_(1.0)
    lin1.weight[:m, E: E + m] = torch.eye(m)
    lin1.bias[:m] = 10.0
    lin2.weight[:, :m] = torch.eye(m)
    return model


# --- training ---------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    spec: str
    seed: int
    params: int
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    hard: list[float] = field(default_factory=list)  # match3: accuracy on the hard positions
    ms_per_step: float = 0.0

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def loss_and_hits(model: OneLayer, tokens: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    out = model(tokens)
    if model.task == "compose":
        loss = nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())
        return loss, (out.argmax(-1) == target).float().sum().item()
    loss = nn.functional.binary_cross_entropy_with_logits(out, target)
    return loss, ((out > 0).float() == target).float().sum().item()


@torch.no_grad()
def evaluate(model: OneLayer, test, hard: torch.Tensor | None = None, chunk: int = 512) -> tuple[float, float | None]:
    """Held-out accuracy, and on the ``hard`` positions when given."""
    tokens, target = test
    out = torch.cat([model(tokens[i: i + chunk]) for i in range(0, len(tokens), chunk)])
    hits = (out.argmax(-1) if model.task == "compose" else (out > 0).float()) == target
    return hits.float().mean().item(), None if hard is None else hits[hard].float().mean().item()


def train(task: str, spec: str, seed: int, args, hidden: int, test, hard: torch.Tensor | None) -> Run:
    torch.manual_seed(seed)
    model = OneLayer(task, spec, args, hidden)
    run = Run(task, spec, seed, sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = np.random.default_rng([seed, 1])  # training stream, independent of the held-out set
    batch = args.batch or {"compose": 32, "match3": 64}[task]
    step_time = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss, _ = loss_and_hits(model, *make_batch(task, batch, args, data))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_time += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            run.steps.append(step)
            acc, acc_hard = evaluate(model, test, hard)
            run.accuracy.append(acc)
            if acc_hard is not None:
                run.hard.append(acc_hard)
    run.ms_per_step = 1000 * step_time / args.steps
    hard_note = f"  on hard positions {run.hard[-1]:.3f}" if run.hard else ""
    print(f"  {task:<8} {spec:<9} seed {seed}  held-out accuracy {run.final:.3f}{hard_note}  "
          f"best {max(run.accuracy):.3f}  {run.ms_per_step:.1f} ms/step", flush=True)
    return run


# --- report -----------------------------------------------------------------------------------


def mean_spread(values: list[float], digits: int = 3) -> str:
    """mean ± half the range over seeds (with 3 seeds the range says more than a std)."""
    mid = statistics.fmean(values)
    half = (max(values) - min(values)) / 2
    return f"{mid:.{digits}f} ± {half:.{digits}f}"


Refs = dict[str, dict[str, tuple[float, float | None]]]


def table(runs: list[Run], refs: Refs) -> str:
    rows = [
        "| task | attention | params | final held-out accuracy | per seed | match3: on hard positions | ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r.task for r in runs):
        for spec in MECHANISMS:
            rs = [r for r in runs if r.task == task and r.spec == spec]
            if not rs:
                continue
            per_seed = " / ".join(f"{r.final:.3f}" for r in rs)
            hard = mean_spread([r.hard[-1] for r in rs]) if rs[0].hard else "-"
            ms = mean_spread([r.ms_per_step for r in rs], digits=1)
            rows.append(f"| {task} | {spec} | {rs[0].params:,} | {mean_spread([r.final for r in rs])} | {per_seed} | "
                        f"{hard} | {ms} |")
        for name, (value, hard) in refs[task].items():
            rows.append(f"| {task} | *{name}* | | {value:.3f} | | {'-' if hard is None else f'{hard:.3f}'} | |")
    return "\n".join(rows)


def plot(runs: list[Run], refs: Refs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.2), squeeze=False)
    colors = dict(zip(MECHANISMS, ("tab:gray", "tab:blue", "tab:orange", "tab:green")))
    for ax, task in zip(axes[0], tasks):
        for spec in MECHANISMS:
            rs = [r for r in runs if r.task == task and r.spec == spec]
            for i, r in enumerate(rs):
                ax.plot(r.steps, r.accuracy, color=colors[spec], alpha=0.8, lw=1.2, label=spec if i == 0 else None)
        for (name, (value, _)), style in zip(refs[task].items(), (":", "-.")):  # the first two references
            ax.axhline(value, color="black", linestyle=style, lw=0.8, label=name)
        ax.set_title({"compose": "2-fold composition g(f(x))", "match3": "Match3: p_i + p_j + p_k = 0 (mod M)"}[task])
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("one attention layer, same width and parameter count; one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=(*TASKS, "both"), default="both")
    ap.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--m", type=int, default=8, help="compose: size of each alphabet (sequence 2m+1)")
    ap.add_argument("--queries", type=int, default=None, help="compose: query tokens per sequence (default m)")
    ap.add_argument("--n", type=int, default=8, help="match3: sequence length")
    ap.add_argument("--M", type=int, default=53, help="match3: modulus")
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64, help="MLP hidden width of the order-3 models")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: compose 32, match3 64)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--test-size", type=int, default=1024, help="held-out sequences")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, comparable timings)")
    ap.add_argument("--out", default="composition.png", help="learning curves (PNG)")
    ap.add_argument("--quick", action="store_true", help="a few steps on small batches (smoke test)")
    args = ap.parse_args(argv)
    args.queries = args.m if args.queries is None else args.queries
    if args.quick:
        args.steps, args.batch, args.eval_every, args.test_size, args.seeds = 6, 16, 3, 64, args.seeds[:1]
    return args


def main(argv=None) -> list[Run]:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _experiment(args)
    finally:
        torch.set_num_threads(threads)


def _experiment(args) -> list[Run]:
    tasks = TASKS if args.task == "both" else (args.task,)
    runs, refs = [], {}
    for task in tasks:
        test = make_batch(task, args.test_size, args, np.random.default_rng([10_000, TASKS.index(task)]))
        refs[task] = chance_levels(task, test, args)
        if task == "compose":  # the solution each order-3 mechanism admits, without training
            for spec in ("tree", "strassen", "triple"):
                try:
                    model = hand_set(OneLayer(task, spec, args, args.hidden), args.m)
                except ValueError as err:  # too narrow for the construction
                    print(f"  no hand-set {spec} model: {err}")
                    continue
                refs[task][f"{spec}, hand-set weights (no training)"] = evaluate(model, test)
        hidden = hidden_sizes(args, args.m if task == "compose" else 1)
        hard = hard_positions(task, test, args)
        print(f"{task}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in refs[task].items()), flush=True)
        for spec in args.mechanisms:
            for seed in args.seeds:
                runs.append(train(task, spec, seed, args, hidden[spec], test, hard))
    print()
    print(table(runs, refs))
    plot(runs, refs, args.out)
    print(f"\nlearning curves saved to {args.out}")
    return runs


if __name__ == "__main__":
    main()
