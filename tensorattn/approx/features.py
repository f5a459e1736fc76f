"""Symmetric tensor-power feature maps built from index tables (DESIGN 5.1).

A score s = sum_I prod_m x_m[I] over D index tuples has s^t = sum_{|alpha|=t} (t!/alpha!) prod_m
x_m^alpha, where alpha runs over multisets of size t of the D coordinates. Each operand therefore
gets the feature vector phi(x)_alpha = x^alpha for all multisets of size <= g, rank
r = C(D+g, g). Degree-t monomials are built from degree-(t-1) ones as parent x one coordinate
(the coordinate is >= the parent's last one, so each multiset appears once), in one batched
gather-multiply per degree; no Python loop over monomials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class MonomialTables:
    """Index tables for monomials of degree <= g in D variables.

    ``parents[t]`` / ``coords[t]`` build degree t (t >= 1) from degree t-1. ``degree`` and
    ``multinomial`` (t!/alpha!, exact integers, as float64) are per monomial over all degrees.
    """

    D: int
    g: int
    parents: tuple[np.ndarray, ...]
    coords: tuple[np.ndarray, ...]
    degree: np.ndarray
    multinomial: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.degree.shape[0])


def rank_for(D: int, g: int) -> int:
    """r = C(D+g, g), the number of monomials of degree <= g in D variables."""
    return math.comb(D + g, g)


@lru_cache(maxsize=64)
def monomial_tables(D: int, g: int) -> MonomialTables:
    parents: list[np.ndarray] = [np.zeros(0, np.int64)]
    coords: list[np.ndarray] = [np.zeros(0, np.int64)]
    last = np.zeros(1, np.int64)  # last coordinate of each degree-(t-1) monomial
    run = np.zeros(1, np.int64)  # multiplicity of that last coordinate
    weight = np.ones(1, dtype=object)  # exact (t-1)!/alpha!
    degrees = [np.zeros(1, np.int64)]
    weights = [weight]
    for t in range(1, g + 1):
        counts = D - last
        total = int(counts.sum())
        parent = np.repeat(np.arange(last.shape[0]), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        coord = np.arange(total) - starts + np.repeat(last, counts)
        same = (coord == last[parent]) & (t > 1)
        new_run = np.where(same, run[parent] + 1, 1)
        # t!/alpha'! = (t-1)!/alpha! * t / (alpha'_c), exact in Python integers
        new_weight = (weight[parent] * t) // new_run.astype(object)
        parents.append(parent)
        coords.append(coord)
        degrees.append(np.full(total, t, np.int64))
        weights.append(new_weight)
        last, run, weight = coord, new_run, new_weight
    multinomial = np.concatenate(weights).astype(np.float64)
    return MonomialTables(D, g, tuple(parents), tuple(coords), np.concatenate(degrees), multinomial)


@lru_cache(maxsize=64)
def _torch_tables(D: int, g: int, device: str):
    tab = monomial_tables(D, g)
    return [torch.as_tensor(p, device=device) for p in tab.parents], [
        torch.as_tensor(c, device=device) for c in tab.coords
    ]


def feature_map(x: torch.Tensor, g: int) -> torch.Tensor:
    """phi(x) for x of shape (..., D): all monomials of degree <= g, shape (..., C(D+g, g))."""
    D = x.shape[-1]
    parents, coords = _torch_tables(D, g, str(x.device))
    level = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    out = [level]
    for t in range(1, g + 1):
        level = level.index_select(-1, parents[t]) * x.index_select(-1, coords[t])
        out.append(level)
    return torch.cat(out, dim=-1)


def query_weights(coeffs: np.ndarray, scale: float, D: int, g: int) -> np.ndarray:
    """Per-monomial weight c_t * scale^t * t!/alpha!, all on the query side (DESIGN 5.1)."""
    tab = monomial_tables(D, g)
    ct = np.asarray(coeffs, np.float64) * float(scale) ** np.arange(g + 1)
    return ct[tab.degree] * tab.multinomial
