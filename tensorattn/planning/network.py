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

import math
import string
from dataclasses import dataclass
from functools import lru_cache

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


@lru_cache(maxsize=256)  # planning repeats per call; the path search costs milliseconds
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


#: slowdown per counted flop of the whole-matrix network against the chunked methods
NETWORK_OVERHEAD = 4.0


def poly_methods(spec: Spec, causal: bool) -> list[str]:
    """The poly methods that can run an attention polynomial: ``network`` (any, non-causal),
    ``moments`` (terms that are inner products of whole slot arrays, non-causal), ``tree`` (a tree
    with one term per edge, causal or not) and ``triangle`` (the Strassen triangle, causal)."""
    st = spec.structure
    entrywise = spec.value_einsum.entrywise
    pairs = spec.pair_terms
    two_slot = [t for t in st.terms if t.order == 2]
    tree = st.kind == "tree" and entrywise and len(two_slot) == len(st.edges)
    triangle = (pairs is not None and st.kind == "cycle" and st.order == 3 and entrywise and len(pairs) == 3)
    if causal:
        return [m for m, ok in (("tree", tree), ("triangle", triangle)) if ok]
    methods = ["network"]
    if pairs is not None and entrywise and len(pairs) == len(st.terms):
        methods.append("moments")
    if tree:
        methods.append("tree")
    return methods


def method_flops(method: str, spec: Spec, Z: int, sizes: tuple[int, ...], degrees: tuple[int, ...],
                 ranks: tuple[int, ...], E: int, networks: tuple[Network, ...] | None, D: int) -> float:
    """Multiply-add estimate of a poly method (features and contractions), for the planner's choice."""
    Ea = E + 1
    terms = spec.terms
    features = sum(sizes[s] * r for t, r in zip(terms, ranks) for s in t.slots)
    if method == "network":
        # the network holds whole feature matrices and reads them once per contraction step: memory
        # bound, several times slower per flop than the chunked methods
        return NETWORK_OVERHEAD * (Z * features + sum(net.flops for net in networks or ()) / 2)
    if method == "tree":
        return Z * sum(2 * sum(sizes[s] for s in t.slots) * r * Ea + sum(sizes[s] for s in t.slots) * r
                       for t, r in zip(terms, ranks) if t.order == 2)
    if method == "triangle":
        r = max(ranks)
        return Z * (9 * sizes[0] * r * r * Ea + features)
    if method == "moments":
        total, core_shapes, subs = 0.0, [], []
        sym = opt_einsum.get_symbol
        slot_terms = [[i for i, t in enumerate(terms) if s in t.slots] for s in range(spec.order)]
        for s, t_ids in enumerate(slot_terms):
            R = math.comb(D + sum(degrees[i] for i in t_ids), D)
            total += sizes[s] * R * (2 * Ea + 1) + math.prod(ranks[i] for i in t_ids) * Ea
            if s:
                core_shapes.append((1, *[ranks[i] for i in t_ids], Ea))
                subs.append(sym(0) + "".join(sym(2 + i) for i in t_ids) + sym(1))
        q = "".join(sym(2 + i) for i in slot_terms[0])
        info = opt_einsum.contract_path(",".join(subs) + "->" + sym(0) + q + sym(1), *core_shapes,
                                        shapes=True, optimize="dp")[1]
        return Z * (total + float(info.opt_cost) / 2)
    raise ValueError(method)
