"""Convert a trained torch model to tensorattn in one line, and see per layer what it costs.

The model is a plain torch classifier: token + position embeddings -> nn.TransformerEncoder (2
layers, 4 heads, batch_first, dropout 0.1) with a key padding mask -> masked mean pool -> linear.
The task: sequences of 8 to 32 tokens from a vocabulary of 8, padded to 32; the label is the most
frequent token (ties to the smallest), which needs attention over the whole, variable-length
sequence. It trains for a few hundred steps with AdamW on fresh random batches.

Then, for each backend ("exact", "auto", "poly"), a copy of the trained model is converted with

    report = ta.nn.convert(model, sample, backend=backend, tol=1e-3)

which replaces every nn.MultiheadAttention by a MultiheadTensorAttention with the same weights
and runs the sample batch once to fill the report: per layer, the entry bound B against the
threshold, whether poly is certified there and with which error bound, and the backend the layer
runs. The held-out loss and accuracy are printed before and after.

Run:  python examples/convert_model.py            (400 steps; minutes on 2 CPU cores)
      python examples/convert_model.py --quick    (a few seconds; a smoke test)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

import tensorattn as ta

VOCAB, LENGTH, MIN_LENGTH = 8, 32, 8


def make_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (size, LENGTH), padding mask (True on padded positions) and the majority token."""
    x = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
    lengths = torch.randint(MIN_LENGTH, LENGTH + 1, (size,), generator=generator)
    pad = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    counts = F.one_hot(x, VOCAB).masked_fill(pad[..., None], 0).sum(1)
    return x.masked_fill(pad, 0), pad, counts.argmax(-1)


class Classifier(nn.Module):
    def __init__(self, embed: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, embed)
        self.positions = nn.Parameter(torch.randn(LENGTH, embed) * 0.02)
        layer = nn.TransformerEncoderLayer(embed, heads, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(embed, VOCAB)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tokens(x) + self.positions, src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def evaluate(model: nn.Module, batch) -> tuple[float, float]:
    x, pad, y = batch
    model.eval()
    with torch.no_grad():
        logits = model(x, pad)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def train(steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, pad, y = make_batch(64, generator)
        loss = F.cross_entropy(model(x, pad), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}: training loss {loss.item():.4f}")
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps and a small held-out set")
    args = parser.parse_args(argv)
    steps, held = (10, 32) if args.quick else (args.steps, 512)

    start = time.perf_counter()
    print(f"training a 2-layer nn.TransformerEncoder classifier for {steps} steps")
    model = train(steps, args.seed)
    held_out = make_batch(held, torch.Generator().manual_seed(args.seed + 1))
    loss0, acc0 = evaluate(model, held_out)
    print(f"trained in {time.perf_counter() - start:.1f} s; held-out loss {loss0:.4f}, accuracy {acc0:.3f}\n")

    results = {"torch": (loss0, acc0)}
    sample = held_out[:2]  # the model's positional arguments: tokens and padding mask
    for backend in ["exact", "auto", "poly"]:
        converted = copy.deepcopy(model)
        report = ta.nn.convert(converted, sample, backend=backend, tol=args.tol)
        loss, acc = evaluate(converted, held_out)
        results[backend] = (loss, acc, report)
        print(f"ta.nn.convert(model, sample, backend={backend!r}, tol={args.tol:g})")
        print(report)
        print(f"held-out loss {loss:.6f} (change {loss - loss0:+.2e}), accuracy {acc:.3f} (change {acc - acc0:+.3f})\n")
    return results


if __name__ == "__main__":
    main()
