"""What the caller asks for (``Request``) and what the planner decides on (``Problem``).

``Request`` holds every setting of a call that is not an array: the backend, the tolerance, what
to do past the threshold, causal masking, the scale, and the backend knobs. Each setting has its
default here and nowhere else, and is validated once, when the Request is built. ``Problem``
holds the sizes and the bound statistics of one call, without the arrays: what ``make_plan``
needs to choose a degree, a cost and a backend.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

from .approx.polynomials import APPROXIMANTS, DEFAULT_MAX_DEGREE
from .checks import check_bool, check_choice, check_int, check_number
from .errors import InputError, valid_names
from .registry import AUTO, registered
from .spec import Spec

ON_UNBOUNDED = ("raise", "fallback", "ignore")
FEATURE_DTYPES = ("float32", "float64")
#: largest polynomial degree a call may ask for (max_degree, degree): past it the float64 coefficients
#: and ranks are meaningless, and the degree search stays bounded
MAX_DEGREE = 100
#: largest q_offset: positions are exact in float64 (RoPE angles) up to 2^53
MAX_POSITION = 2**53


@dataclass(frozen=True)
class Request:
    """Every non-array setting of an attention call, validated once.

    Attributes:
        backend: ``"auto"``, ``"exact"``, ``"poly"`` or another registered backend.
        tol: certified ``max|out - exact| <= tol * vmax`` for poly, in (0, 1).
        on_unbounded: what poly does past the threshold: ``"raise"``, ``"fallback"`` or ``"ignore"``.
        causal: keys at positions <= the query's only.
        scale: score scale; None means 1/sqrt(D).
        q_offset: position of the first query (decoding with a KV cache); None means 0.
        max_degree, max_rank: caps on the polynomial the poly backend may use.
        approximant: ``"chebyshev"`` or ``"taylor"``.
        memory_budget: bytes per working tile (an upper bound: exact's tile steps stay within 8 MiB
            for the cache, ``planning.cost.EXACT_STEP_BYTES``).
        degree: pin the polynomial degree (experiments); the certificate is for that degree.
        feature_dtype: pin the feature dtype (``"float32"`` / ``"float64"``) of poly.
        need_grad: choose the degree for the gradient certificate too; None detects it from the
            inputs' ``requires_grad``.
        features, seed: rank and seed of the random-feature baseline ``favor``.

    >>> Request(tol=1e-4).tol
    0.0001
    >>> Request(tol=2)
    Traceback (most recent call last):
    ...
    tensorattn.errors.InputError: tol=2 must be a finite number in (0, 1); tol bounds max|out - exact| / max|v|
    """

    backend: str = AUTO
    tol: float = 1e-3
    on_unbounded: str = "raise"
    causal: bool = False
    scale: float | None = None
    q_offset: int | None = None
    max_degree: int = DEFAULT_MAX_DEGREE
    max_rank: int = 1 << 21
    approximant: str = "chebyshev"
    memory_budget: int = 64 << 20
    degree: int | None = None
    feature_dtype: str | None = None
    need_grad: bool | None = None
    features: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not isinstance(self.backend, str) or (self.backend != AUTO and self.backend not in registered()):
            raise InputError(
                f"unknown backend {self.backend!r}; valid backends are "
                f"{valid_names(self.backend, [AUTO, *registered()])}"
            )
        set_("tol", check_number("tol", self.tol, low=0.0, high=1.0, low_open=True, high_open=True,
                                 hint="tol bounds max|out - exact| / max|v|"))
        set_("on_unbounded", check_choice("on_unbounded", self.on_unbounded, ON_UNBOUNDED))
        set_("causal", check_bool("causal", self.causal))
        if self.scale is not None:
            set_("scale", check_number("scale", self.scale, hint="None means 1/sqrt(D)"))
        if self.q_offset is not None:
            set_("q_offset", check_int("q_offset", self.q_offset, low=0, high=MAX_POSITION,
                                       hint="the position of the first query (queries sit at q_offset..q_offset+n-1)"))
        set_("max_degree", check_int("max_degree", self.max_degree, low=0, high=MAX_DEGREE))
        set_("max_rank", check_int("max_rank", self.max_rank, low=1))
        set_("approximant", check_choice("approximant", self.approximant, APPROXIMANTS))
        set_("memory_budget", check_int("memory_budget", self.memory_budget, low=1,
                                        hint="bytes per working tile (default 64 MiB)"))
        if self.degree is not None:
            set_("degree", check_int("degree", self.degree, low=0, high=MAX_DEGREE))
        if self.feature_dtype is not None:
            set_("feature_dtype", check_choice("feature_dtype", self.feature_dtype, FEATURE_DTYPES))
        if self.need_grad is not None:
            set_("need_grad", check_bool("need_grad", self.need_grad))
        set_("features", check_int("features", self.features, low=1))
        set_("seed", check_int("seed", self.seed, low=0, high=2**63 - 1))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_call(cls, spec: Spec, **kwargs: Any) -> tuple["Request", dict[str, Any]]:
        """Split call keywords into a Request and the spec's own options (with their defaults).

        >>> import tensorattn as ta
        >>> req, opts = Request.from_call(ta.get_spec("rope"), tol=1e-4, rope_base=500.0)
        >>> req.tol, opts["rope_base"], opts["rope_layout"]
        (0.0001, 500.0, 'interleaved')
        """
        try:  # the same keywords again (a model's every call): validated once, reused
            key = (spec, tuple(registered()), tuple((k, type(v), v) for k, v in kwargs.items()))
            hit = _FROM_CALL.get(key)
        except TypeError:  # an unhashable option (rel=W ...)
            key, hit = None, None
        if hit is not None:
            return hit[0], dict(hit[1])
        fields = _FIELDS
        unknown = [k for k in kwargs if k not in fields and k not in spec.options]
        if unknown:
            raise InputError(
                f"unknown option {unknown[0]!r} for spec {spec.name!r}; valid options are "
                f"{valid_names(unknown[0], [*fields, *spec.options])}"
            )
        request = cls(**{k: v for k, v in kwargs.items() if k in fields})
        spec_options = {**spec.options, **{k: v for k, v in kwargs.items() if k in spec.options}}
        if key is not None:
            _FROM_CALL[key] = (request, dict(spec_options))
            if len(_FROM_CALL) > FROM_CALL_CACHE_SIZE:
                _FROM_CALL.pop(next(iter(_FROM_CALL)))
        return request, spec_options

    def with_causal(self, causal: bool | None) -> "Request":
        """This request with ``causal`` replaced (None keeps it)."""
        return self if causal is None or causal == self.causal else dataclasses.replace(self, causal=causal)


_FIELDS = frozenset(Request.names())
#: validated Requests of recent calls, by (spec, registered backends, keywords with their types):
#: a hit is the Request ``from_call`` would build again (True and 1 are different keys)
_FROM_CALL: dict = {}
FROM_CALL_CACHE_SIZE = 256


@dataclass(frozen=True)
class TermStats:
    """Bound statistics of one term of an attention polynomial: its score radius ``beta``, its
    entry bound ``B``, the number of slots it names (``order``, which sets its threshold) and its
    contracted dimension ``D``."""

    beta: float
    B: float
    order: int
    D: int


@dataclass(frozen=True)
class Problem:
    """Sizes and bound statistics of one call: what the planner decides on.

    ``n`` queries, ``ms`` keys per key slot, ``D`` the expanded feature size (product of the
    contracted index sizes), ``value_dims`` the flattened value size of each slot, ``E`` the
    flattened output value size, ``Z`` the product of the batch dims. ``beta`` bounds every
    |score|, ``B`` is the papers' entry bound, ``vmax`` bounds |value of a key tuple|. ``dtype`` is
    the compute dtype of the inputs ("float32" or "float64"), ``out_dtype`` the dtype of the result
    the caller receives (None: ``dtype``). ``linf`` is max |entry| of each slot's array, query
    first (the numeric range of the scores), ``value_linf`` that of each value operand. For spec
    ``relative``, ``relative`` is the support of W and ``alibi_slope`` its decay. For an attention
    polynomial ``terms`` holds each term's statistics; ``beta`` is then the radius of the whole
    score (the sum of the terms'). ``key_mask`` is None, ``"binary"`` (key weights 0 or 1) or
    ``"additive"`` (a float key bias); ``attn_mask`` says a general (per query) mask is present.
    Backends that cannot apply a mask refuse the problem in ``serves``.
    """

    spec: Spec
    n: int
    ms: tuple[int, ...]
    D: int
    value_dims: tuple[int, ...]
    E: int
    beta: float
    B: float
    scale: float
    Z: int = 1
    causal: bool = False
    vmax: float = 1.0
    dtype: str = "float32"
    need_grad: bool = False
    q_offset: int = 0
    relative: Any = None
    alibi_slope: float = 0.0
    #: per-term statistics of an attention polynomial (empty for a single-term spec)
    terms: tuple[TermStats, ...] = ()
    #: the shape of each key slot's value per token (value_dims flattens them)
    value_shapes: tuple[tuple[int, ...], ...] = ()
    key_mask: str | None = None
    attn_mask: bool = False
    out_dtype: str | None = None
    linf: tuple[float, ...] = ()
    value_linf: tuple[float, ...] = ()

    @property
    def order(self) -> int:
        return self.spec.order

    @property
    def result_dtype(self) -> str:
        """The dtype of the result the caller receives."""
        return self.out_dtype or self.dtype

    @property
    def n_max(self) -> int:
        """The sequence length of the threshold: max(n, m)."""
        return max(self.n, *self.ms)


def default_scale(D: int) -> float:
    """1/sqrt(D), as torch's scaled_dot_product_attention."""
    return 1.0 / math.sqrt(D) if D > 0 else 1.0


def with_call_signature(*leading: inspect.Parameter, trailing: tuple[inspect.Parameter, ...] = ()):
    """Give a ``f(q, k, v, *, ..., **options)`` frontend the signature that lists every Request
    setting with its default, so ``help()`` and IDEs show them while the defaults live only here."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        kw = inspect.Parameter.KEYWORD_ONLY
        settings = [inspect.Parameter(f.name, kw, default=f.default, annotation=f.type)
                    for f in dataclasses.fields(Request)]
        var = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=[*params, *leading, *settings, *trailing, *var])
        return fn

    return decorate
