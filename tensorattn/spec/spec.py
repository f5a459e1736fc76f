"""The frozen Spec: what an attention mechanism is."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from types import MappingProxyType
from typing import Any, Mapping

from ..checks import shorten
from ..errors import SpecError
from .parser import MAX_ORDER, ScoreEinsum, ValueEinsum, default_value_expr, parse_score, parse_value
from .polynomial import SlotLayout, Structure, Term, parse_polynomial

POSITIONAL_KINDS = (None, "rope", "relative")
#: the options every spec of a positional kind has, with their defaults (a spec may override them)
POSITIONAL_OPTIONS = {
    "rope": {"rope_base": 10000.0, "rope_layout": "interleaved"},
    "relative": {"rel": None, "alibi_slope": None},
}


@dataclass(frozen=True)
class Spec:
    """An attention mechanism declared by einsum strings.

    Args:
        name: registry name.
        score: score einsum with one operand per token slot, query first, e.g. ``"id,jd,kd->ijk"``;
            or an attention polynomial, a sum of terms over subsets of the slots, e.g. Strassen
            attention ``"id,jd->ij + jd,kd->jk + kd,id->ki"`` (see docs/poly-attention.md).
        value: optional value einsum with one operand per key slot, e.g. ``"je,ke->ie"``.
            The default is the entrywise product of the per-slot values.
        positional: ``None``, ``"rope"`` (rotate q and k by position) or ``"relative"``
            (position-dependent matrices ``W[i-j]`` between q and k; order 2 only).
        options: spec-specific options and their defaults (e.g. ``rope_base``).
        description: one line for ``list_specs`` and reports.
        coefficients: one real coefficient per term of the score (default 1 each).
        block_sizes: for a slot whose array concatenates per-term blocks, the size of each block
            letter (default: the slot's feature axis split equally between its blocks).

    >>> s = Spec("mine", "ia,jb,kab->ijk")
    >>> s.order, s.contracted, s.separable
    (3, ('a', 'b'), True)
    >>> Spec("strassen3", "id,jd->ij + jd,kd->jk + kd,id->ki").structure.kind
    'cycle'
    """

    name: str
    score: str
    value: str | None = None
    positional: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    coefficients: tuple[float, ...] | None = None
    block_sizes: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(
                f"spec name {shorten(repr(self.name))} must be a non-empty identifier such as 'my_spec'"
            )
        if not isinstance(self.score, str):
            raise SpecError(f"spec {self.name!r}: score einsum must be a string like 'id,jd->ij', got "
                            f"{type(self.score).__name__}")
        if self.coefficients is not None:
            coeffs = tuple(self.coefficients) if isinstance(self.coefficients, (list, tuple)) else None
            if coeffs is None or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coeffs
            ):
                raise SpecError(
                    f"spec {self.name!r}: coefficients={self.coefficients!r} must be a sequence of finite "
                    "numbers, one per term of the score"
                )
            object.__setattr__(self, "coefficients", tuple(float(c) for c in coeffs))
        if self.block_sizes is not None:
            if not isinstance(self.block_sizes, Mapping) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.block_sizes.values()
            ):
                raise SpecError(
                    f"spec {self.name!r}: block_sizes={self.block_sizes!r} must map block letters to ints >= 1"
                )
            object.__setattr__(self, "block_sizes", MappingProxyType(dict(self.block_sizes)))
        layout = self.slots  # parses the score; raises SpecError naming the term
        value = self.value if self.value is not None else default_value_expr(layout)
        if not isinstance(value, str):
            raise SpecError(f"spec {self.name!r}: value einsum must be a string like 'je,ke->ie' or None, got "
                            f"{type(value).__name__}")
        object.__setattr__(self, "value", value.replace(" ", ""))
        parse_value(self.value, layout)
        if layout.order > MAX_ORDER and self.exact_path == "tuples":
            k = layout.order
            raise SpecError(
                f"spec {self.name!r}: score {shorten(repr(self.score))} has {k} token slots and is not a tree "
                f"of pairwise terms ({self.structure.kind}), so exact attention would visit n^{k - 1} key tuples "
                f"per query ({3 ** (k - 1):.2e} already at n = 3); tensorattn supports up to {MAX_ORDER} slots "
                f"for such scores. Fix: use at most {MAX_ORDER} token slots, or a tree of pairwise terms (any "
                "number of slots, exact in quadratic time)"
            )
        if not (self.positional is None or isinstance(self.positional, str)) or self.positional not in POSITIONAL_KINDS:
            raise SpecError(
                f"spec {self.name!r}: positional={shorten(repr(self.positional))} is not one of "
                f"{POSITIONAL_KINDS}"
            )
        if self.positional is not None:
            if not self.structure.single or layout.order != 2 or layout.features != ("d", "d"):
                raise SpecError(
                    f"spec {self.name!r}: positional={self.positional!r} needs the pairwise score "
                    f"'id,jd->ij', got {shorten(repr(self.score))}"
                )
        if self.block_sizes:
            known = {c for b in layout.blocks if b for c in b}
            unknown = sorted(set(self.block_sizes) - known)
            if unknown:
                raise SpecError(
                    f"spec {self.name!r}: block_sizes names {unknown}, which no slot concatenates "
                    f"(block letters: {sorted(known) or 'none'})"
                )
        if not isinstance(self.options, Mapping) or not all(isinstance(key, str) for key in self.options):
            raise SpecError(f"spec {self.name!r}: options must be a dict {{option name: default}}, got "
                            f"{shorten(repr(self.options))}")
        if not isinstance(self.description, str):
            raise SpecError(f"spec {self.name!r}: description must be a string, got {type(self.description).__name__}")
        options = {**POSITIONAL_OPTIONS.get(self.positional, {}), **self.options}
        object.__setattr__(self, "options", MappingProxyType(options))

    def __reduce__(self):
        # the options mapping is a read-only proxy, which pickle cannot copy; rebuild from a dict
        return (
            type(self),
            (self.name, self.score, self.value, self.positional, dict(self.options), self.description,
             self.coefficients, None if self.block_sizes is None else dict(self.block_sizes)),
        )

    def _key(self) -> tuple:
        blocks = None if self.block_sizes is None else tuple(sorted(self.block_sizes.items()))
        return (self.name, self.score, self.value, self.positional, self.coefficients, blocks)

    @cached_property
    def _hash(self) -> int:
        return hash(self._key())

    def __hash__(self) -> int:  # specs key the layout, plan and expression caches of every call
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec):
            return NotImplemented
        return self._key() == other._key() and dict(self.options) == dict(other.options)

    @cached_property
    def is_polynomial(self) -> bool:
        """True when the score is a sum of several terms (an attention polynomial) or carries a
        coefficient; False for a single einsum over every slot."""
        return not self.structure.single or self.structure.terms[0].coefficient != 1.0

    @cached_property
    def _parsed(self) -> tuple[SlotLayout, Structure]:
        if "+" not in self.score and self.coefficients is None:
            se = parse_score(self.score)  # a single einsum: today's rules and messages
            layout = SlotLayout(expr=se.expr, tokens=se.tokens, operands=se.operands, features=se.features,
                                blocks=(None,) * se.order)
            _, structure = parse_polynomial(self.score)
            return layout, structure
        return parse_polynomial(self.score, self.coefficients)

    @property
    def slots(self) -> SlotLayout:
        """The arrays this spec takes: one per token slot, query first."""
        return self._parsed[0]

    @property
    def structure(self) -> Structure:
        """Order, terms, the slot graph and whether it is a tree or has a cycle."""
        return self._parsed[1]

    @property
    def terms(self) -> tuple[Term, ...]:
        return self.structure.terms

    @property
    def pair_terms(self) -> tuple[tuple[int, int, float], ...] | None:
        """``(a, b, coefficient)`` per term (a < b) when every term is the inner product of two slots'
        whole arrays and all slots share one feature letter, as in ``strassen`` and ``tree``; else
        None. Such specs have one vector per slot, which some poly methods need."""
        lay = self.slots
        if any(lay.blocks) or len(set(lay.features)) != 1 or len(lay.features[0]) != 1:
            return None
        out = []
        for term in self.terms:
            if term.order != 2 or term.contracted != (lay.features[0],):
                return None
            a, b = sorted(term.slots)
            out.append((a, b, term.coefficient))
        return tuple(out)

    @property
    def exact_path(self) -> str:
        """How the exact backend computes this spec: ``"tree"`` (message passing), ``"triangle"``
        (matrix products) or ``"tuples"`` (streaming over key tuples, any spec). The first two need
        an attention polynomial of that structure whose values multiply entrywise."""
        if self.is_polynomial and self.value_einsum.entrywise:
            kind = self.structure.kind
            if kind == "tree":
                return "tree"
            if kind == "cycle" and self.order == 3:
                return "triangle"
        return "tuples"

    @cached_property
    def score_einsum(self) -> ScoreEinsum:
        """The score einsum of a single-term spec (an attention polynomial has ``terms``)."""
        if self.is_polynomial:
            raise SpecError(
                f"spec {self.name!r} is an attention polynomial with {len(self.terms)} term(s); its score is "
                "not one einsum. Use spec.terms (each term's einsum) and spec.slots (the arrays it takes)"
            )
        return parse_score(self.score)

    @cached_property
    def value_einsum(self) -> ValueEinsum:
        return parse_value(self.value, self.slots)

    @property
    def order(self) -> int:
        """Number of token slots k (2 for pairwise, 3 for triple)."""
        return self.slots.order

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.slots.tokens

    @property
    def contracted(self) -> tuple[str, ...]:
        """Contracted (feature) index letters of every term, in first-seen order."""
        out: list[str] = []
        for term in self.terms:
            for c in term.contracted:
                if c not in out:
                    out.append(c)
        return tuple(out)

    @property
    def separable(self) -> bool:
        """True when every score term factors over the slots, so the polynomial method applies
        through feature maps. Relative-position specs (W depends on i - j) are not separable."""
        return self.positional != "relative"

    def feature_dim(self, sizes: Mapping[str, int]) -> int:
        """The contracted dimension D: the number of index tuples summed in one score (for an
        attention polynomial, the largest over its terms)."""
        return max(prod(sizes[c] for c in term.contracted) for term in self.terms)

    def __repr__(self) -> str:
        extra = f", positional={self.positional!r}" if self.positional else ""
        if self.coefficients is not None:
            extra += f", coefficients={self.coefficients!r}"
        return f"Spec({self.name!r}, score={self.score!r}, value={self.value!r}{extra})"
