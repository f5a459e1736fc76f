"""The tensor network of an attention polynomial under the polynomial method.

With each term's exp replaced by its certified polynomial written as features,
P_t(term_t) = sum_r prod_{s in t} U_{t,s}[token_s, r], the weight of a key tuple is
prod_t P_t(term_t), and the output is a tensor network over the slots' tokens and the terms'
feature indices:

    out_i = sum_{key tokens} prod_t prod_{s in t} U_{t,s}[token_s, r_t] * value(key tokens)

normalized by the same network without values. opt_einsum's path optimiser orders the
contraction: a tree costs O(n r e) per edge, the Strassen triangle O(n r^2 e + r^3 e). The plan
records the expression and the path; the backend only executes them.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import opt_einsum

from ..spec import Spec


@dataclass(frozen=True)
class Network:
    """One contraction: ``expr`` over operands of ``shapes`` (batch letter first on every one).

    Operand order: the feature matrices of every term operand (term by term, in operand order),
    then the value operands (``with_values``). ``augmented``: values carry a trailing 1 column, so
    one contraction gives numerator and normalizer (the entrywise-product value combine)."""

    expr: str
    shapes: tuple[tuple[int, ...], ...]
    path: tuple[tuple[int, ...], ...]
    flops: int
    largest: int  # elements of the largest intermediate
    with_values: bool
    augmented: bool

    @property
    def description(self) -> str:
        return f"{self.expr}  ({self.flops:.3e} flops, largest intermediate {self.largest:,} elements)"


def _letters(spec: Spec) -> tuple[str, list[str], str]:
    used = set(spec.tokens) | set(spec.value) | set("".join(spec.slots.features))
    free = [c for c in string.ascii_letters if c not in used]
    return free[0], free[1: 1 + len(spec.terms)], free[1 + len(spec.terms)]


def build_networks(spec: Spec, Z: int, n: int, ms: tuple[int, ...], ranks: tuple[int, ...],
                   value_shapes: tuple[tuple[int, ...], ...]) -> tuple[Network, ...]:
    """The contraction(s) poly runs for ``spec``: one with values [v | 1] when they combine
    entrywise, else a numerator network (with values) and a normalizer network (without)."""
    batch, feats, aug = _letters(spec)
    tokens = spec.tokens
    sizes = (n, *ms)
    ve = spec.value_einsum
    ops, shapes = [], []
    for t, term in enumerate(spec.terms):
        for slot in term.slots:
            ops.append(batch + tokens[slot] + feats[t])
            shapes.append((Z, sizes[slot], ranks[t]))
    key_slots = range(1, spec.order)
    if spec.value_einsum.entrywise:
        # values flattened to e entries plus a column of ones: numerator and normalizer at once
        vops = [batch + tokens[s] + aug for s in key_slots]
        vshapes = [(Z, sizes[s], _flat(v) + 1) for s, v in zip(key_slots, value_shapes)]
        variants = [(ops + vops, shapes + vshapes, batch + tokens[0] + aug, True, True)]
    else:
        vops = [batch + tokens[s] + letters for s, letters in zip(key_slots, ve.value_letters)]
        vshapes = [(Z, sizes[s], *v) for s, v in zip(key_slots, value_shapes)]
        variants = [(ops + vops, shapes + vshapes, batch + tokens[0] + ve.out_letters, True, False),
                    (ops, shapes, batch + tokens[0], False, False)]
    networks = []
    for operands, op_shapes, out, with_values, augmented in variants:
        expr = ",".join(operands) + "->" + out
        path, info = opt_einsum.contract_path(expr, *op_shapes, shapes=True, optimize="auto")
        networks.append(Network(expr=expr, shapes=tuple(tuple(x) for x in op_shapes), path=tuple(path),
                                flops=int(info.opt_cost), largest=int(info.largest_intermediate),
                                with_values=with_values, augmented=augmented))
    return tuple(networks)


def _flat(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
