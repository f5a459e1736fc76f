"""Attention polynomials: a score that is a sum of terms over the token slots.

Chakrabarti, Pitassi & Alman, *Poly-attention* (arXiv 2602.02422): the weight of a key tuple is
exp(h), where h, the attention polynomial, is a sum of monomials over the token slots. Each term
here is an einsum over a subset of the slots, e.g. Strassen attention (Kozachinskiy et al.,
arXiv 2501.19215) is ``"id,jd->ij + jd,kd->jk + kd,id->ki"``. A slot's array is shared by every
term that names its token index.

Slots are numbered by first appearance of their token index, so the query slot is the first
token index of the first term. A slot whose occurrences carry *different* feature letters (each
occurrence one letter) holds their concatenation: ``"ia,ja->ij + ib,kb->ik"`` gives the query one
feature axis of size |a| + |b|, split into the blocks a then b (separate projections per
occurrence).

``Structure`` tells the planner how a polynomial can be computed: a **tree** (every term has at
most 2 slots and the 2-slot terms form a tree) by message passing in O(n^2) per edge, a **cycle**
of 2-slot terms (e.g. the Strassen triangle) by matrix products, and anything else over key tuples.
"""

from __future__ import annotations

import string
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from ..errors import SpecError
from .parser import ScoreEinsum, parse_term

#: how much of a long expression an error message quotes
_QUOTE = 120


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE else text[: _QUOTE - 3] + "...")


@dataclass(frozen=True)
class Term:
    """One term of an attention polynomial: ``coefficient * einsum(operands)``.

    ``slots`` are the global slot indices of the term's operands, in operand order; ``einsum``
    is the parsed term (its ``features`` are the letters each operand contracts)."""

    einsum: ScoreEinsum
    slots: tuple[int, ...]
    coefficient: float = 1.0

    @property
    def expr(self) -> str:
        return self.einsum.expr

    @property
    def order(self) -> int:
        """Number of slots the term names (its threshold is (ln n)^(1/order))."""
        return len(self.slots)

    @property
    def contracted(self) -> tuple[str, ...]:
        return self.einsum.contracted


@dataclass(frozen=True)
class SlotLayout:
    """The arrays a spec takes: one per slot, query first.

    ``operands[s]`` is slot s's array subscript (token index, then one letter per feature axis);
    ``blocks[s]`` is None, or the block letters when slot s's single feature axis concatenates
    several per-term blocks (then ``features[s]`` is one synthetic letter naming that axis)."""

    expr: str
    tokens: tuple[str, ...]
    operands: tuple[str, ...]
    features: tuple[str, ...]
    blocks: tuple[tuple[str, ...] | None, ...]

    @property
    def order(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Structure:
    """What the planner needs to know about a spec's score.

    ``edges`` are the slot pairs joined by 2-slot terms (each pair once); ``parent[s]`` is the
    parent of slot s in the tree rooted at the query (None for the query, and for every slot when
    the structure is not a tree)."""

    order: int
    terms: tuple[Term, ...]
    edges: tuple[tuple[int, int], ...]
    is_tree: bool
    has_cycle: bool
    parent: tuple[int | None, ...]

    @property
    def single(self) -> bool:
        """One term over every slot: today's monomial specs (pairwise, triple, order k)."""
        return len(self.terms) == 1 and self.terms[0].order == self.order

    @property
    def pairwise_terms(self) -> bool:
        """Every term has at most 2 slots."""
        return all(t.order <= 2 for t in self.terms)

    @property
    def kind(self) -> str:
        """'single', 'tree', 'cycle' (2-slot terms with a cycle) or 'general'."""
        if self.single:
            return "single"
        if self.is_tree:
            return "tree"
        if self.pairwise_terms and self.has_cycle:
            return "cycle"
        return "general"

    @property
    def causal_pairs(self) -> tuple[tuple[int, int], ...]:
        """(later, earlier) slot pairs of the causal mask: position[later] <= position[earlier].
        A tree masks each child against its parent (k <= j <= i on the path i-j-k); anything else
        masks every key slot against the query."""
        if self.is_tree and not self.single:
            return tuple((c, p) for c, p in enumerate(self.parent) if p is not None)
        return tuple((slot, 0) for slot in range(1, self.order))

    def children(self, slot: int) -> tuple[int, ...]:
        return tuple(s for s, p in enumerate(self.parent) if p == slot)

    def describe(self) -> str:
        terms = " + ".join(
            (f"{t.coefficient:g}*" if t.coefficient != 1.0 else "") + t.expr for t in self.terms
        )
        return f"{self.kind} over {self.order} slots: {terms}"


def split_terms(score: str) -> list[str]:
    """The term strings of a score (terms are separated by '+')."""
    if not isinstance(score, str):
        raise SpecError(f"score einsum must be a string like 'id,jd->ij', got {type(score).__name__}")
    parts = [p.strip() for p in score.split("+")]
    for pos, p in enumerate(parts):
        if not p:
            raise SpecError(f"score {_quote(score)}: term {pos} is empty (two '+' in a row, or a '+' at an end)")
    return parts


@lru_cache(maxsize=256)
def parse_polynomial(score: str, coefficients: tuple[float, ...] | None = None) -> tuple[SlotLayout, Structure]:
    """Parse a sum of terms into the slot layout and the structure; SpecError names the term."""
    parts = split_terms(score)
    coeffs = (1.0,) * len(parts) if coefficients is None else coefficients
    if len(coeffs) != len(parts):
        raise SpecError(
            f"score {_quote(score)} has {len(parts)} term(s) but coefficients has {len(coeffs)} value(s); "
            "give one coefficient per term"
        )
    parsed: list[ScoreEinsum] = []
    for pos, part in enumerate(parts):
        try:
            parsed.append(parse_term(part))
        except SpecError as exc:
            raise SpecError(f"term {pos} ({_quote(part)}) of score {_quote(score)}: {exc}") from None
    tokens: list[str] = []
    for term in parsed:
        for tok in term.tokens:
            if tok not in tokens:
                tokens.append(tok)
    # each slot's occurrences: (term index, feature letters)
    occurrences: list[list[tuple[int, str]]] = [[] for _ in tokens]
    for t, term in enumerate(parsed):
        for tok, feats in zip(term.tokens, term.features):
            occurrences[tokens.index(tok)].append((t, feats))
    feature_letters = {c for term in parsed for f in term.features for c in f}
    spare = iter(c for c in string.ascii_uppercase + string.ascii_lowercase
                 if c not in feature_letters and c not in tokens)
    features, blocks = [], []
    for s, occ in enumerate(occurrences):
        kinds = {f for _, f in occ}
        if len(kinds) == 1:
            features.append(occ[0][1])
            blocks.append(None)
            continue
        if any(len(f) != 1 for _, f in occ):
            bad = next((t, f) for t, f in occ if len(f) != 1)
            raise SpecError(
                f"term {bad[0]} ({_quote(parts[bad[0]])}) of score {_quote(score)}: slot {tokens[s]!r} carries "
                f"different features in different terms ({', '.join(sorted(repr(k) for k in kinds))}); that is "
                "allowed only with one feature letter per occurrence (the slot's array is then the "
                "concatenation of the blocks). Fix: use the same subscript in every term, or one letter each"
            )
        order = []
        for _, f in occ:
            if f not in order:
                order.append(f)
        features.append(next(spare))
        blocks.append(tuple(order))
    slot_of = {tok: s for s, tok in enumerate(tokens)}
    terms = tuple(
        Term(einsum=term, slots=tuple(slot_of[t] for t in term.tokens), coefficient=float(c))
        for term, c in zip(parsed, coeffs)
    )
    layout = SlotLayout(
        expr=score, tokens=tuple(tokens), operands=tuple(tok + f for tok, f in zip(tokens, features)),
        features=tuple(features), blocks=tuple(blocks),
    )
    return layout, _structure(score, parts, terms, len(tokens))


def _structure(score: str, parts: list[str], terms: tuple[Term, ...], order: int) -> Structure:
    # reachability from the query through terms (a term joins all of its slots)
    reached, frontier = {0}, deque([0])
    while frontier:
        s = frontier.popleft()
        for term in terms:
            if s in term.slots:
                for other in term.slots:
                    if other not in reached:
                        reached.add(other)
                        frontier.append(other)
    if len(reached) < order:
        lost = sorted(set(range(order)) - reached)
        where = next(p for p, t in enumerate(terms) if set(t.slots) & set(lost))
        raise SpecError(
            f"term {where} ({_quote(parts[where])}) of score {_quote(score)}: slot(s) "
            f"{[terms[where].einsum.tokens[terms[where].slots.index(s)] for s in lost if s in terms[where].slots]} "
            "cannot be reached from the query slot through the terms, so their tokens would not interact "
            "with the query. Fix: add a term that joins them to the query's terms"
        )
    edges: list[tuple[int, int]] = []
    for term in terms:
        if term.order == 2:
            edge = tuple(sorted(term.slots))
            if edge not in edges:
                edges.append(edge)
    pairwise = all(t.order <= 2 for t in terms)
    # a spanning graph on `order` nodes is a tree iff it has order - 1 edges and is connected
    connected = _connected(order, edges)
    is_tree = pairwise and connected and len(edges) == order - 1
    has_cycle = len(edges) > order - 1 if connected else _has_cycle(order, edges)
    parent: list[int | None] = [None] * order
    if is_tree:
        seen, frontier = {0}, deque([0])
        while frontier:
            s = frontier.popleft()
            for a, b in edges:
                other = b if a == s else a if b == s else None
                if other is not None and other not in seen:
                    seen.add(other)
                    parent[other] = s
                    frontier.append(other)
    return Structure(order=order, terms=terms, edges=tuple(edges), is_tree=is_tree, has_cycle=has_cycle,
                     parent=tuple(parent))


def _connected(order: int, edges: list[tuple[int, int]]) -> bool:
    seen, frontier = {0}, deque([0])
    while frontier:
        s = frontier.popleft()
        for a, b in edges:
            for x, y in ((a, b), (b, a)):
                if x == s and y not in seen:
                    seen.add(y)
                    frontier.append(y)
    return len(seen) == order


def _has_cycle(order: int, edges: list[tuple[int, int]]) -> bool:
    root = list(range(order))

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra == rb:
            return True
        root[ra] = rb
    return False
