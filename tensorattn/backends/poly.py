"""Polynomial-method backend for every separable spec (docs/design.md#the-polynomial-method).

exp(s) is replaced by the certified polynomial P(s) = sum_t c_t s^t chosen by the plan. With
phi the symmetric tensor-power feature map of each slot's expanded D-vector and all coefficients on
the query side, P(s_{i j_1 .. j_{k-1}}) = sum_r U_q[i, r] prod_m U_m[j_m, r]. Summing over the key
tuples factorizes:

    out_i = U_q[i] . combine_m(U_m^T [v_m | 1])     (the combine is the value einsum, entrywise in r)

so the cost is O((n + sum m) r e) instead of O(n prod m d), in token chunks whose features stay in
cache. Causal attention runs in blocks: P inside each diagonal block, prefix states across blocks
(``poly_causal``). For short sequences the plan may pick the direct form, P evaluated from the
scores (docs/design.md#the-direct-form).

The factorized engine (``FactorizedAttention``) takes feature callables, so the random-feature and
Taylor baselines and the distributed frontend reuse it with their own feature maps.
"""

from __future__ import annotations

import dataclasses
import math
import string
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import opt_einsum
import torch

from ..approx.features import augment, feature_map, polynomial_features, query_weights
from ..approx.polynomials import get_approximant
from ..inputs import Operands, expand_operand, lasting, term_operands
from ..masks import factorized_refusal
from ..planning.network import poly_methods
from ..registry import Backend, Refusal
from .exact import contract
from .poly_causal import causal_factorized, polynomial_score_kernel
from .poly_terms import moments_poly, tree_poly, triangle_poly_causal
from .relative_fft import relative_attention

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
#: feature elements per chunk (4 MiB in float32): they stay in cache between the feature map and
#: the GEMM that consumes them. Measured at n = 65,536, rank 495, one thread: chunks of 2k-8k
#: tokens run 1.3-1.4x faster than 16k-token chunks (features written to memory and read back);
#: in a later interleaved run (n = 16,384-65,536, d = 4-16) 1M elements per chunk was as fast as
#: 2M or faster (up to 1.2x), with smaller chunks paying for more calls.
CACHE_ELEMS = 1 << 20

#: per thread, the feature buffers of the last call, by (role, dtype, device): reused by the next
#: call. A buffer of a few MiB freshly allocated per call costs its page faults on first write
#: (about as much as the feature map itself at n = 1,024); each holds at most CACHE_ELEMS elements.
_WORKSPACE = threading.local()
#: feature programs (``approx.features.FeatureProgram``) kept with the buffers, one per chunk shape
#: and feature map; past this many (a workload of many shapes) they are made afresh
MAX_PROGRAMS = 32


def _workspace() -> dict:
    ws = getattr(_WORKSPACE, "buffers", None)
    if ws is None:
        ws = _WORKSPACE.buffers = {}
    return ws


def _programs() -> dict:
    """This thread's feature programs, by (buffer key, feature map, D, Z, chunk): (buffer, program)."""
    ps = getattr(_WORKSPACE, "programs", None)
    if ps is None:
        ps = _WORKSPACE.programs = {}
    return ps


@dataclass
class FactorizedAttention:
    """out_i = U_q[i] . combine_m(U_m^T [v_m | 1]) for any feature maps.

    ``xs`` are the expanded operands (query first, (Z, N, D) each), ``values`` the flattened values
    (Z, m, e_m), ``query_features`` / ``key_features`` map (Z, c, D) chunks to (Z, c, r).
    ``key_weights`` (Z, m) per slot (or None) multiply each key's features: 0 drops a masked key
    from numerator and normalizer alike; ``visible`` (Z, n) marks the queries that see an unmasked
    key tuple, the others get the output 0 (docs/design.md#masks).
    """

    ops: Operands
    xs: list[torch.Tensor]
    values: list[torch.Tensor]
    value_shapes: list[tuple[int, ...]]
    query_features: FeatureFn
    key_features: FeatureFn
    rank: int
    budget_elems: int
    #: per-feature query weights folded into the combined statistics (r,), or None; or built on
    #: first use by ``weights_fn`` (the direct form never needs them)
    query_weights: torch.Tensor | None = None
    #: per key slot, the key mask as weights 0/1 (Z, m), or None
    key_weights: list[torch.Tensor | None] | None = None
    #: (Z, n) bool: queries that see at least one unmasked key tuple; None when all do
    visible: torch.Tensor | None = None
    #: optional (xq (B, b, D), [xk_t (B, b, D)]) -> sum_r w_r U_q[i, r] prod_t U_t[j_t, r] straight
    #: from the expanded operands, layout (B, j_h, .., j_1, i): the causal diagonal blocks use it
    score_kernel: Callable | None = None
    #: evaluate P from the scores (the plan's direct form) instead of through the features
    direct: bool = False
    weights_fn: Callable[[], torch.Tensor] | None = None
    #: per (role, dtype, device), a flat buffer the chunks' features are written into: this
    #: thread's workspace, shared by the calls that run on it one after another
    buffers: dict = field(default_factory=_workspace)
    programs: dict = field(default_factory=_programs)
    large: dict = field(default_factory=dict)
    large_programs: dict = field(default_factory=dict)  # the programs of ``large``, also for this call only

    @classmethod
    def from_ops(cls, ops: Operands, query_features: FeatureFn, key_features: FeatureFn, rank: int,
                 dtype: torch.dtype, budget_bytes: int, query_weights: torch.Tensor | None = None,
                 divisors: tuple[float, ...] | None = None) -> "FactorizedAttention":
        """``divisors`` (one per score operand) divide the operands before the feature maps; the
        caller folds their product into the query weights (homogeneous features only)."""
        se = ops.spec.score_einsum
        operands = [ops.q, *ops.keys]
        divisors = divisors or (1.0,) * len(operands)
        xs = [expand_operand(t.to(dtype) / c if c != 1.0 else t.to(dtype), f, se.contracted, ops.sizes)
              for t, f, c in zip(operands, se.features, divisors)]
        Z = ops.q.shape[0]
        values = [v.to(dtype).reshape(Z, v.shape[1], -1) for v in ops.values]
        shapes = [tuple(v.shape[2:]) for v in ops.values]
        budget = int(budget_bytes) // (8 if dtype == torch.float64 else 4)
        weights = [None if b is None else torch.exp(b).to(dtype) for b in ops.key_bias] or None
        return cls(ops, xs, values, shapes, query_features, key_features, rank, budget, query_weights,
                   key_weights=weights, visible=ops.visible_rows() if weights else None)

    @property
    def combine_expr(self) -> str:
        ve = self.ops.spec.value_einsum
        r = next(c for c in string.ascii_letters if c not in ve.expr)
        return ",".join("..." + r + letters for letters in ve.value_letters) + "->..." + r + ve.out_letters

    def weights(self) -> torch.Tensor | None:
        """The query weights (r,), built by ``weights_fn`` on first use; None without."""
        if self.query_weights is None and self.weights_fn is not None:
            self.query_weights = self.weights_fn()
        return self.query_weights

    def key_weight(self, slot: int) -> torch.Tensor | None:
        """The key mask of one slot as weights (Z, m), or None."""
        return self.key_weights[slot] if self.key_weights else None

    def chunk_features(self, fn: FeatureFn, x: torch.Tensor, role: str) -> torch.Tensor:
        """fn(x) for one chunk of tokens. A feature map that can write into a buffer (``writes_into``)
        gets one buffer per role, reused chunk after chunk: a fresh one per chunk would pay page faults
        on every write. Not while autograd may save the features for the backward."""
        if not getattr(fn, "writes_into", False) or (torch.is_grad_enabled() and self.ops.tracks_grad):
            return fn(x)
        Z, c = x.shape[:2]
        need = Z * self.rank * c
        # a chunk larger than the cache (one token's features past CACHE_ELEMS) keeps its buffer to this call
        buffers, programs = (self.buffers, self.programs) if need <= CACHE_ELEMS else (self.large, self.large_programs)
        key = (role, x.dtype, x.device)
        buf = buffers.get(key)
        if buf is None or buf.numel() < need:
            for k in [k for k, (b, _) in programs.items() if b is buf]:  # they would keep the old one alive
                del programs[k]
            with lasting():  # kept across calls: a normal tensor serves any later mode
                buf = buffers[key] = x.new_empty(need)
        out = buf[:need].view(Z, self.rank, c)
        make = getattr(fn, "program", None)
        if make is None:
            return fn(x, out=out)
        # the map with its views made once, kept with the buffer it writes, per chunk shape
        pkey = (key, fn.program_key, x.shape[-1], Z, c)
        kept = programs.get(pkey)
        if kept is None or kept[0] is not buf:  # none yet, or made for a buffer since replaced
            if len(programs) >= MAX_PROGRAMS:  # many shapes: start over
                programs.clear()
            with lasting():
                kept = programs[pkey] = (buf, make(out, x.shape[-1]))
        return kept[1](x)

    def masked_features(self, x: torch.Tensor, weight: torch.Tensor | None, j0: int, j1: int) -> torch.Tensor:
        """Key features of tokens j0:j1, times their key-mask weight (0 removes a masked key)."""
        U = self.chunk_features(self.key_features, x[:, j0:j1], "keys")
        return U if weight is None else U * weight[:, j0:j1, None]

    def key_state(self, slot: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """U_m^T [v_m | 1] over keys [start, stop) of one slot: (Z, r, e_m + 1)."""
        return self._state(self.xs[1 + slot], self.values[slot], start, stop, self.key_weight(slot))

    def key_states(self) -> list[torch.Tensor]:
        """Every slot's full state; slots of equal shape share one batched feature map and GEMM."""
        keys, values = self.xs[1:], self.values
        if len(keys) > 1 and len({x.shape for x in keys}) == 1 and len({v.shape for v in values}) == 1:
            weights = None
            if self.key_weights and any(w is not None for w in self.key_weights):
                weights = torch.cat([w if w is not None else x.new_ones(x.shape[:2])
                                     for w, x in zip(self.key_weights, keys)])
            return list(self._state(torch.cat(keys), torch.cat(values), 0, None, weights).split(keys[0].shape[0]))
        return [self.key_state(s) for s in range(len(values))]

    def _state(self, x: torch.Tensor, v: torch.Tensor, start: int, stop: int | None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
        stop = x.shape[1] if stop is None else stop
        chunk = self.token_chunk(x.shape[0])
        state = None
        for j0 in range(start, stop, chunk):
            j1 = min(stop, j0 + chunk)
            # ([v|1]^T U)^T: with U a tokens-last buffer this GEMM runs ~2.5x faster than U^T [v|1]
            U = self.masked_features(x, weight, j0, j1)
            part = (augment(v[:, j0:j1]).transpose(1, 2) @ U).transpose(1, 2)
            state = part if state is None else state + part
        return x.new_zeros(x.shape[0], self.rank, v.shape[-1] + 1) if state is None else state

    def token_chunk(self, Z: int) -> int:
        """Tokens per feature chunk: within the memory budget, and small enough that a chunk's
        features (Z, chunk, r) stay in cache between the feature map that writes them and the GEMM
        that reads them (``CACHE_ELEMS``), so the features never make a round trip to memory."""
        per_token = Z * self.rank
        return max(1, min(self.budget_elems // (2 * per_token), CACHE_ELEMS // per_token))

    def normalize(self, res: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """res[..., :-1] / res[..., -1:] for queries i0:i1; a query that sees no unmasked key tuple
        (normalizer 0) gets 0, with a zero gradient."""
        if self.visible is None:
            return res[..., :-1] / res[..., -1:]
        seen = self.visible[:, i0:i1, None]
        return torch.where(seen, res[..., :-1] / torch.where(seen, res[..., -1:], 1.0), 0.0)

    def combine(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Value einsum on the numerators (entrywise in r), product of normalizers, times the query
        weights: (..., r, E+1)."""
        if self.ops.spec.value_einsum.entrywise:  # the default: [v | 1] columns multiply entrywise
            combined = states[0]
            for s in states[1:]:
                combined = combined * s
        else:
            lead = states[0].shape[:-1]
            nums = [s[..., :-1].reshape(*lead, *vs) for s, vs in zip(states, self.value_shapes)]
            num = contract(self.combine_expr, *nums).reshape(*lead, -1)
            den = states[0][..., -1:]
            for s in states[1:]:
                den = den * s[..., -1:]
            combined = torch.cat([num, den], dim=-1)
        w = self.weights()
        if w is not None:
            combined = combined * w[:, None]
        return combined

    def apply_queries(self, combined: torch.Tensor) -> torch.Tensor:
        """out = (U_q combined)[:, :E] / (U_q combined)[:, E] over query chunks: (Z, n, E)."""
        xq = self.xs[0]
        chunk = self.token_chunk(xq.shape[0])
        outs = []
        ct = combined.transpose(1, 2)
        for i0 in range(0, xq.shape[1], chunk):
            # (E+1, r) @ (r, c): the feature buffer is tokens-last, so this GEMM reads it contiguously
            res = (ct @ self.chunk_features(self.query_features, xq[:, i0: i0 + chunk], "queries").transpose(1, 2)
                   ).transpose(1, 2)
            outs.append(self.normalize(res, i0, i0 + res.shape[1]))
        return torch.cat(outs, dim=1)

    def full(self) -> torch.Tensor:
        states = self.key_states()
        return self.apply_queries(self.combine(states))

    def causal(self, initial: list[torch.Tensor] | None = None, key_offset: int = 0) -> torch.Tensor:
        """Causal output (Z, n, E): key j is visible to query i iff j + key_offset <= i + q_offset.

        ``initial`` holds states of keys before this shard (all visible), for sequence parallelism.
        Blocks of positions: exact attention under P inside each diagonal block, the prefix state
        across blocks (docs/design.md#causal-poly, ``poly_causal``)."""
        return causal_factorized(self, initial, key_offset)

    def direct_form(self) -> torch.Tensor:
        """Order 2, non-causal: out = P(S) [v | 1] with P evaluated from the scores by the score
        kernel, in query chunks of the memory budget and the cache (docs/design.md#the-direct-form)."""
        xq, xk = self.xs
        vt = self.values[0].transpose(1, 2)
        weight = self.key_weight(0)
        Z, n = xq.shape[:2]
        # a chunk's scores within the cache as well as the budget (as the exact backend's tiles)
        chunk = max(1, min(n, min(self.budget_elems, CACHE_ELEMS) // (2 * Z * xk.shape[1])))
        outs = []
        for i0 in range(0, n, chunk):
            A = self.score_kernel(xq[:, i0: i0 + chunk], [xk])  # (Z, m, c): P(s_ij) at [j, i]
            if weight is not None:
                A = A * weight[..., None]
            num = torch.bmm(vt, A).transpose(1, 2)  # (Z, c, e)
            den = A.sum(dim=1)[..., None]  # (Z, c, 1)
            outs.append(self.normalize(torch.cat([num, den], dim=-1), i0, i0 + num.shape[1])
                        if self.visible is not None else num / den)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def run(self) -> torch.Tensor:
        if self.ops.causal:
            out = self.causal()
        else:
            out = self.direct_form() if self.direct and self.score_kernel is not None else self.full()
        return out.reshape(out.shape[0], self.ops.n, *self.ops.out_value_shape).to(self.ops.dtype)


def polynomial_engine(plan, ops: Operands, factorized: bool = False) -> FactorizedAttention:
    """The factorized engine with the plan's certified polynomial features. ``factorized=True``
    keeps the feature path (key states, query weights) even where the plan picked the direct form:
    for callers that combine key states themselves (the sequence-parallel frontend)."""
    cert = plan.certificate
    g = cert.degree
    dtype = _DTYPES[cert.feature_dtype]
    divisors = plan.unit_divisors
    scale = ops.scale * math.prod(divisors)  # the operands are divided by the divisors
    direct = plan.poly_form == "direct" and cert.direct_ok and not factorized
    engine = FactorizedAttention.from_ops(
        ops,
        query_features=polynomial_features(g),
        key_features=polynomial_features(g),
        rank=cert.rank,
        dtype=dtype,
        budget_bytes=plan.request.memory_budget,
        divisors=divisors,
    )
    # built when the feature path first needs them: the direct form evaluates P from the scores
    engine.weights_fn = lambda: _query_weight_tensor(plan.approximant, float(plan.beta), g, scale, ops.D, dtype,
                                                     ops.q.device)
    if cert.direct_ok:  # P from the scores stays within the certified roundoff
        engine.score_kernel = _score_kernel(plan.approximant, float(plan.beta), g, scale)
        engine.direct = direct
    return engine


# The same plan (a model's layers, a training loop's steps) reuses its polynomial's query weights
# and score kernel: both are functions of the arguments alone, built once. Tensors kept across
# calls are made outside inference mode: one made in it could not be saved for a later backward.
@lru_cache(maxsize=64)
def _query_weight_tensor(approximant: str, beta: float, g: int, scale: float, D: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    coeffs = get_approximant(approximant).coefficients(beta, g)
    with lasting():
        return torch.as_tensor(query_weights(coeffs, scale, D, g), dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _score_kernel(approximant: str, beta: float, g: int, scale: float):
    return polynomial_score_kernel(get_approximant(approximant).coefficients(beta, g), scale)


def term_features(plan, ops: Operands, dtype: torch.dtype) -> list[torch.Tensor]:
    """Feature matrices (Z, N, r_t) of every term operand, term by term, in the order of the plan's
    networks. Each term's coefficients (c_t, (coefficient * scale)^t, multinomials) sit on its first
    operand."""
    spec, cert = ops.spec, plan.certificate
    approx = get_approximant(plan.approximant)
    arrays = [x.to(dtype) for x in (ops.q, *ops.keys)]
    out = []
    for term, stats, tc in zip(spec.terms, plan.problem.terms, cert.terms):
        g = tc.degree
        D = stats.D
        coeffs = approx.coefficients(float(stats.beta), g)
        w = torch.as_tensor(query_weights(coeffs, ops.scale * term.coefficient, D, g), dtype=dtype,
                            device=ops.q.device)
        for a, (x, feats) in enumerate(zip(term_operands(spec, ops.sizes, arrays, term), term.einsum.features)):
            phi = feature_map(expand_operand(x, feats, term.contracted, ops.sizes), g)
            out.append(phi * w if a == 0 else phi)
    return out


def network_attention(plan, ops: Operands) -> torch.Tensor:
    """An attention polynomial under the polynomial method: the plan's tensor network(s) over the
    terms' feature matrices, contracted in the order opt_einsum chose."""
    dtype = _DTYPES[plan.certificate.feature_dtype]
    features = term_features(plan, ops, dtype)
    Z = ops.q.shape[0]
    results = []
    for net in plan.networks:
        if net.augmented:
            values = [augment(v.to(dtype).reshape(Z, v.shape[1], -1)) for v in ops.values]
        else:
            values = [v.to(dtype) for v in ops.values] if net.with_values else []
        operands = [*features, *values]
        results.append(_network_expression(net)(*operands, backend="torch"))
    if plan.networks[0].augmented:
        out = results[0][..., :-1] / results[0][..., -1:]
    else:
        num, den = results
        out = num / den.reshape(*den.shape, *([1] * (num.ndim - den.ndim)))
    return out.reshape(Z, ops.n, *ops.out_value_shape).to(ops.dtype)


@lru_cache(maxsize=128)
def _network_expression(net):
    return opt_einsum.contract_expression(net.expr, *net.shapes, optimize=[tuple(p) for p in net.path])


class PolyBackend(Backend):
    """Certified polynomial-method attention for separable specs (pairwise, triple, order-k, rope,
    custom einsum specs) and, through FFT-Toeplitz products, spec ``relative``; causal or not."""

    name = "poly"
    certified = True
    applies_masks = True

    def serves(self, spec, problem) -> bool | Refusal:
        refusal = factorized_refusal(problem)
        if refusal is not None:
            return refusal
        if spec.is_polynomial and problem is not None and problem.key_mask:
            return Refusal(f"key masks with the attention polynomial {spec.name!r} run on backend='exact'")
        if spec.is_polynomial and problem is not None and problem.causal and not poly_methods(spec, True):
            return Refusal(
                f"causal masking of the attention polynomial {spec.name!r} ({spec.structure.kind}) has a fast "
                "factorized form only for trees (one term per edge) and the Strassen triangle; run it with "
                "backend='exact'"
            )
        if spec.separable or spec.positional == "relative":
            return True
        return Refusal("its score is not a sum of products of per-token factors")

    def run(self, plan, ops: Operands) -> torch.Tensor:
        if plan.rel_folded:  # the same W at every offset: s_ij = scale (q_i^T W) k_j, pairwise
            return polynomial_engine(plan, dataclasses.replace(ops, q=ops.q @ ops.rel[0].to(ops.q.dtype))).run()
        if ops.spec.positional == "relative":
            return relative_attention(plan, ops)
        if ops.spec.is_polynomial:
            dtype = _DTYPES[plan.certificate.feature_dtype]
            method = plan.poly_method
            if method == "network":
                return network_attention(plan, ops)
            run = {"moments": moments_poly, "tree": tree_poly, "triangle": triangle_poly_causal}[method]
            out = run(plan, ops, dtype)
            return out.reshape(ops.q.shape[0], ops.n, *ops.out_value_shape).to(ops.dtype)
        return polynomial_engine(plan, ops).run()
