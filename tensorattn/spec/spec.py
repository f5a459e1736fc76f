"""The frozen Spec: what an attention mechanism is."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from types import MappingProxyType
from typing import Any, Mapping

from ..checks import shorten
from ..errors import SpecError
from .parser import ScoreEinsum, ValueEinsum, default_value_expr, parse_score, parse_value

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
        score: score einsum with one operand per token slot, query first, e.g. ``"id,jd,kd->ijk"``.
        value: optional value einsum with one operand per key slot, e.g. ``"je,ke->ie"``.
            The default is the entrywise product of the per-slot values.
        positional: ``None``, ``"rope"`` (rotate q and k by position) or ``"relative"``
            (position-dependent matrices ``W[i-j]`` between q and k; order 2 only).
        options: spec-specific options and their defaults (e.g. ``rope_base``).
        description: one line for ``list_specs`` and reports.

    >>> s = Spec("mine", "ia,jb,kab->ijk")
    >>> s.order, s.contracted, s.separable
    (3, ('a', 'b'), True)
    """

    name: str
    score: str
    value: str | None = None
    positional: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(
                f"spec name {shorten(repr(self.name))} must be a non-empty identifier such as 'my_spec'"
            )
        parsed = parse_score(self.score)
        value = self.value if self.value is not None else default_value_expr(parsed)
        if not isinstance(value, str):
            raise SpecError(f"spec {self.name!r}: value einsum must be a string like 'je,ke->ie' or None, got "
                            f"{type(value).__name__}")
        object.__setattr__(self, "value", value.replace(" ", ""))
        parse_value(self.value, parsed)
        if not (self.positional is None or isinstance(self.positional, str)) or self.positional not in POSITIONAL_KINDS:
            raise SpecError(
                f"spec {self.name!r}: positional={shorten(repr(self.positional))} is not one of "
                f"{POSITIONAL_KINDS}"
            )
        if self.positional is not None:
            if parsed.order != 2 or parsed.features != ("d", "d"):
                raise SpecError(
                    f"spec {self.name!r}: positional={self.positional!r} needs the pairwise score "
                    f"'id,jd->ij', got {shorten(repr(self.score))}"
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
            (self.name, self.score, self.value, self.positional, dict(self.options), self.description),
        )

    def __hash__(self) -> int:
        return hash((self.name, self.score, self.value, self.positional))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec):
            return NotImplemented
        return (self.name, self.score, self.value, self.positional, dict(self.options)) == (
            other.name,
            other.score,
            other.value,
            other.positional,
            dict(other.options),
        )

    @property
    def score_einsum(self) -> ScoreEinsum:
        return parse_score(self.score)

    @property
    def value_einsum(self) -> ValueEinsum:
        return parse_value(self.value, self.score_einsum)

    @property
    def order(self) -> int:
        """Number of token slots k (2 for pairwise, 3 for triple)."""
        return self.score_einsum.order

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.score_einsum.tokens

    @property
    def contracted(self) -> tuple[str, ...]:
        """Contracted (feature) index letters; D is the product of their sizes."""
        return self.score_einsum.contracted

    @property
    def separable(self) -> bool:
        """True when every score term factors over the slots, so the polynomial method applies
        through feature maps. Relative-position specs (W depends on i - j) are not separable."""
        return self.positional != "relative"

    def feature_dim(self, sizes: Mapping[str, int]) -> int:
        """The contracted dimension D: the number of index tuples summed in one score."""
        return prod(sizes[c] for c in self.contracted)

    def __repr__(self) -> str:
        extra = f", positional={self.positional!r}" if self.positional else ""
        return f"Spec({self.name!r}, score={self.score!r}, value={self.value!r}{extra})"
