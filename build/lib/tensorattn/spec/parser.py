"""Parse and validate score / value einsum strings into frozen recipes (parsed once, cached)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache

from ..errors import SpecError

_LETTERS = set(string.ascii_letters)


@dataclass(frozen=True)
class ScoreEinsum:
    """A parsed score einsum such as ``"id,jd,kd->ijk"``.

    ``operands[m]`` is the subscript string of token slot ``m`` (slot 0 is the query). Its first
    letter is the slot's token index; the rest are its feature indices, one array dim each.
    """

    expr: str
    operands: tuple[str, ...]
    output: str
    tokens: tuple[str, ...]
    features: tuple[str, ...]  # feature letters of each operand
    contracted: tuple[str, ...]  # every non-token letter, in first-seen order

    @property
    def order(self) -> int:
        return len(self.operands)


@dataclass(frozen=True)
class ValueEinsum:
    """A parsed value einsum such as ``"je,ke->ie"``: one operand per key slot."""

    expr: str
    operands: tuple[str, ...]
    output: str
    value_letters: tuple[str, ...]  # value letters of each operand (token letter stripped)
    out_letters: str  # value letters of the output (query token stripped)
    summed: tuple[str, ...]  # value letters that appear in no output position

    @property
    def entrywise(self) -> bool:
        """True when every slot's values carry the output's letters and nothing is summed: the
        values of a key tuple multiply entrywise (the default), so [v | 1] gives the normalizer too."""
        return not self.summed and all(letters == self.out_letters for letters in self.value_letters)


def _split(expr: str, what: str) -> tuple[list[str], str]:
    if not isinstance(expr, str):
        raise SpecError(f"{what} einsum must be a string like 'id,jd->ij', got {type(expr).__name__}")
    compact = expr.replace(" ", "")
    if "->" not in compact:
        raise SpecError(
            f"{what} einsum {expr!r} has no '->': write the output explicitly, e.g. 'id,jd->ij'"
        )
    lhs, _, rhs = compact.partition("->")
    if "->" in rhs:
        raise SpecError(f"{what} einsum {expr!r} has more than one '->'")
    for ch in lhs.replace(",", "") + rhs:
        if ch not in _LETTERS:
            raise SpecError(
                f"{what} einsum {expr!r} contains the character {ch!r}; only ASCII letters, ',' and "
                "'->' are allowed (no ellipsis: leading batch/head dims are implicit)"
            )
    operands = lhs.split(",") if lhs else []
    for pos, op in enumerate(operands):
        if not op:
            raise SpecError(f"{what} einsum {expr!r}: operand {pos} is empty")
        if len(set(op)) != len(op):
            raise SpecError(
                f"{what} einsum {expr!r}: operand {pos} ({op!r}) repeats an index; traces and "
                "diagonals are not supported"
            )
    if len(set(rhs)) != len(rhs):
        raise SpecError(f"{what} einsum {expr!r}: output {rhs!r} repeats an index")
    return operands, rhs


@lru_cache(maxsize=256)
def parse_score(expr: str) -> ScoreEinsum:
    """Parse a score einsum with one operand per token slot; raise SpecError explaining any problem."""
    operands, output = _split(expr, "score")
    if len(operands) < 2:
        raise SpecError(
            f"score einsum {expr!r} has {len(operands)} operand(s); it needs a query slot and at "
            "least one key slot, e.g. 'id,jd->ij'"
        )
    return _parse_operands(expr, operands, output)


@lru_cache(maxsize=256)
def parse_term(expr: str) -> ScoreEinsum:
    """Parse one term of an attention polynomial: an einsum over one or more token slots (a term
    may name a single slot, e.g. a per-key bias 'ja->j'), with today's einsum rules."""
    operands, output = _split(expr, "term")
    if not operands:
        raise SpecError(f"term {expr!r} has no operand; write e.g. 'id,jd->ij'")
    return _parse_operands(expr, operands, output)


def _parse_operands(expr: str, operands: list[str], output: str) -> ScoreEinsum:
    if not output:
        raise SpecError(
            f"score einsum {expr!r} has an empty output; list every token index, query first, "
            "e.g. 'id,jd->ij'"
        )
    out_set = set(output)
    tokens: list[str] = []
    for pos, op in enumerate(operands):
        tok = [ch for ch in op if ch in out_set]
        if len(tok) != 1:
            role = "query" if pos == 0 else f"key slot {pos}"
            found = "none" if not tok else ", ".join(repr(t) for t in tok)
            raise SpecError(
                f"score einsum {expr!r}: operand {pos} ({op!r}, the {role}) must carry exactly one "
                f"token index (an index that appears in the output), found {found}"
            )
        if op[0] != tok[0]:
            raise SpecError(
                f"score einsum {expr!r}: operand {pos} ({op!r}) must start with its token index "
                f"{tok[0]!r} (arrays are laid out (..., tokens, features...)); write "
                f"{tok[0] + op.replace(tok[0], '')!r}"
            )
        if tok[0] in tokens:
            other = tokens.index(tok[0])
            raise SpecError(
                f"score einsum {expr!r}: token index {tok[0]!r} is shared by operands {other} and "
                f"{pos}; every slot needs its own token index"
            )
        tokens.append(tok[0])
    if "".join(tokens) != output:
        missing = [t for t in tokens if t not in output]
        extra = [ch for ch in output if ch not in tokens]
        detail = []
        if missing:
            detail.append(f"missing token index {missing}")
        if extra:
            detail.append(f"index {extra} is not the token index of any operand")
        if not detail:
            detail.append("token indices out of operand order")
        raise SpecError(
            f"score einsum {expr!r}: output {output!r} must list every token index in operand "
            f"order, i.e. {''.join(tokens)!r} ({'; '.join(detail)})"
        )
    features = tuple(op[1:] for op in operands)
    contracted: list[str] = []
    for f in features:
        for ch in f:
            if ch not in contracted:
                contracted.append(ch)
    if not contracted:
        raise SpecError(f"score einsum {expr!r} contracts no feature index; every score would be 1")
    return ScoreEinsum(expr, tuple(operands), output, tuple(tokens), features, tuple(contracted))


def default_value_expr(score: ScoreEinsum) -> str:
    """The entrywise product of per-slot values, e.g. ``"je,ke->ie"`` for ``"id,jd,kd->ijk"``."""
    letter = next(ch for ch in "efghxyzuvw" + string.ascii_letters if ch not in score.tokens)
    keys = ",".join(t + letter for t in score.tokens[1:])
    return f"{keys}->{score.tokens[0]}{letter}"


@lru_cache(maxsize=256)
def parse_value(expr: str, score: ScoreEinsum) -> ValueEinsum:
    """Parse a value einsum against its score einsum; raise SpecError explaining any problem."""
    operands, output = _split(expr, "value")
    keys = score.tokens[1:]
    if len(operands) != len(keys):
        raise SpecError(
            f"value einsum {expr!r} has {len(operands)} operand(s) but score einsum "
            f"{score.expr!r} has {len(keys)} key slot(s); give one value operand per key slot"
        )
    value_letters = []
    for pos, (op, tok) in enumerate(zip(operands, keys)):
        if op[0] != tok:
            raise SpecError(
                f"value einsum {expr!r}: operand {pos} ({op!r}) must start with the token index "
                f"{tok!r} of key slot {pos + 1}"
            )
        bad = [ch for ch in op[1:] if ch in score.tokens]
        if bad:
            raise SpecError(
                f"value einsum {expr!r}: operand {pos} ({op!r}) uses token index {bad[0]!r} as a "
                "value index; each value operand carries only its own slot's token index"
            )
        value_letters.append(op[1:])
    if not output or output[0] != score.tokens[0]:
        raise SpecError(
            f"value einsum {expr!r}: output {output!r} must start with the query token index "
            f"{score.tokens[0]!r}, e.g. '{','.join(t + 'e' for t in keys)}->{score.tokens[0]}e'"
        )
    out_letters = output[1:]
    bad = [ch for ch in out_letters if ch in score.tokens]
    if bad:
        raise SpecError(
            f"value einsum {expr!r}: output {output!r} keeps token index {bad[0]!r}; key token "
            "indices are summed by attention and cannot appear in the output"
        )
    seen = set("".join(value_letters))
    unknown = [ch for ch in out_letters if ch not in seen]
    if unknown:
        raise SpecError(
            f"value einsum {expr!r}: output index {unknown[0]!r} appears in no value operand"
        )
    summed = tuple(sorted(seen - set(out_letters)))
    return ValueEinsum(expr, tuple(operands), output, tuple(value_letters), out_letters, summed)
