"""Streaming exact backend: online softmax over key tiles, any spec, O(n * block) memory.

Forward streams over tiles of (query chunk) x (key block per slot) with a running max and sum per
row (log-sum-exp). Backward recomputes each tile, as flash attention does, so training memory also
stays O(n * block): with the saved per-row log-sum-exp L_i and D_i = <dO_i, out_i>, the gradient of
one tile is the gradient of  sum <dO, p V> - sum D_i p  with p = exp(s - L).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import lru_cache

import opt_einsum
import torch

from ..inputs import Operands, full_precision_backward, term_operands
from ..planning.cost import EXACT_STEP_BYTES, exact_key_blocks
from ..positional import alibi_bias, nearest_key_distance, relative_offsets
from ..registry import Backend
from ..spec import Spec
from .structured import create_graph_grads, tree_exact, triangle_exact

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@lru_cache(maxsize=512)
def _expression(expr: str, shapes: tuple[tuple[int, ...], ...]):
    return opt_einsum.contract_expression(expr, *shapes)


def contract(expr: str, *tensors: torch.Tensor) -> torch.Tensor:
    """opt_einsum contraction with a cached compiled expression per (expr, shapes)."""
    return _expression(expr, tuple(tuple(t.shape) for t in tensors))(*tensors, backend="torch")


class TileEngine:
    """Score, mask and value contraction for one tile; shared by forward and backward."""

    def __init__(self, ops: Operands, budget_bytes: int, rel_m: int | None = None):
        """``rel_m`` is the key count W is indexed against (W[i - j + rel_m - 1]); a sequence
        shard's block of keys passes the global m, so that positions stay global."""
        spec = ops.spec
        lay, ve = spec.slots, spec.value_einsum
        self.ops = ops
        self.order = spec.order
        self.scale = ops.scale
        self.relative = spec.positional == "relative"
        self.rel_m = ops.ms[0] if rel_m is None else int(rel_m)
        self.slope = ops.alibi_slope if self.relative else 0.0
        tokens = "".join(lay.tokens)
        if spec.is_polynomial:  # a sum of terms: each term's einsum, placed on the slots it names
            self.score_expr = None
            self.term_exprs = [",".join("..." + op for op in t.einsum.operands) + "->..." + t.einsum.output
                               for t in spec.terms]
        else:
            se = spec.score_einsum
            self.score_expr = ",".join("..." + op for op in se.operands) + "->..." + se.output
        self.value_expr = "..." + tokens + "," + ",".join("..." + op for op in ve.operands) + "->..." + ve.output
        # sum_f q_if k_jf (k'_kf) scores and p-weighted products of values v_je (v'_ke): pairwise,
        # rope, a folded relative (bilinear) and triple (trilinear). Their tiles are GEMMs (plus
        # entrywise products for triple) and the backward is written out, without autograd
        multilinear = 0
        if self.score_expr is not None and not self.relative and len(se.contracted) == 1 and len(ve.out_letters) == 1:
            f, e = se.contracted[0], ve.out_letters
            if (se.operands == tuple(t + f for t in lay.tokens) and se.output == tokens
                    and ve.operands == tuple(t + e for t in lay.tokens[1:]) and ve.output == lay.tokens[0] + e):
                multilinear = spec.order
        self.bilinear, self.trilinear = multilinear == 2, multilinear == 3
        self.causal = ops.causal
        self.causal_pairs = spec.structure.causal_pairs
        self.q_pos = ops.q_positions()
        self.k_pos = [ops.k_positions(s) for s in range(self.order - 1)]
        if self.slope:
            k_pos = self.k_pos[0]
            # the row shift must be the same for every block of keys a row meets: with rel_m (a shard's
            # block of a longer sequence) take the nearest key over the whole sequence, 0 .. rel_m - 1
            first, last = (0, self.rel_m - 1) if rel_m is not None else (int(k_pos[0]), int(k_pos[-1]))
            self.nearest = nearest_key_distance(self.q_pos, first, last, self.causal)
        # tile sizes from the memory budget (at most EXACT_STEP_BYTES, for the cache): a tile holds
        # ~ (4 + d^2 for relative) floats per tuple
        self.key_block = list(exact_key_blocks(ops.ms))
        tuples = math.prod(self.key_block)
        per_tuple = 4 + (ops.sizes["d"] ** 2 if self.relative else 0)
        elem = ops.q.element_size()
        budget = max(1, min(int(budget_bytes), EXACT_STEP_BYTES) // (elem * per_tuple * tuples))
        Z = ops.q.shape[0]
        self.query_chunk = max(1, min(ops.n, budget))
        self.batch_chunk = max(1, min(Z, budget // self.query_chunk))

    def blocks(self, i0: int, i1: int):
        """Key block tuples for a query chunk; causal skips blocks entirely in the future."""
        ranges = [range(0, m, b) for m, b in zip(self.ops.ms, self.key_block)]
        qmax = int(self.q_pos[i1 - 1]) if self.causal else None
        for starts in itertools.product(*ranges):
            if self.causal and any(int(self.k_pos[s][j0]) > qmax for s, j0 in enumerate(starts)):
                continue
            yield tuple((j0, min(j0 + b, m)) for j0, b, m in zip(starts, self.key_block, self.ops.ms))

    def scores(self, q: torch.Tensor, ks: list[torch.Tensor], rel, i0: int, spans, z0: int = 0) -> torch.Tensor:
        """Masked score tile (Z', bq, b_1, ..., b_{k-1}) of batch rows z0.. and queries i0..; masked
        entries are -inf, a float mask's other values are added. Always a new tensor, which the
        callers turn into exp(s - max) in place."""
        if self.relative:
            qp = self.q_pos[i0: i0 + q.shape[1]]
            kp = self.k_pos[0][spans[0][0]: spans[0][1]]
            idx = relative_offsets(self.rel_m, qp, kp)
            s = contract("...ia,ijab,...jb->...ij", q, rel[idx], ks[0]) * self.scale
            if self.slope:
                s = s + alibi_bias(self.slope, qp, kp, s.dtype, self.nearest[i0: i0 + q.shape[1]])
        elif self.score_expr is None:
            s = self._polynomial_scores([q, *ks]) * self.scale
        elif self.bilinear:
            # the scale inside the GEMM: one rounding of scale * (q . k), as the multiply after it
            s = torch.baddbmm(q.new_empty(1, 1, 1), q, ks[0].transpose(1, 2), beta=0, alpha=self.scale)
        elif self.trilinear:  # q against the pair products k_j * k'_k: one GEMM over the feature
            Z, bq, bj, bk = q.shape[0], q.shape[1], ks[0].shape[1], ks[1].shape[1]
            s = torch.baddbmm(q.new_empty(1, 1, 1), q, _pair_products(*ks).transpose(1, 2), beta=0,
                              alpha=self.scale).view(Z, bq, bj, bk)
        else:
            s = contract(self.score_expr, q, *ks) * self.scale
        if self.causal:
            pos = [self.q_pos[i0: i0 + q.shape[1]]] + [self.k_pos[s_][a:b] for s_, (a, b) in enumerate(spans)]
            mask = None
            for later, earlier in self.causal_pairs:
                ok = pos[later][None, :] <= pos[earlier][:, None]  # (earlier tokens, later tokens)
                if later < earlier:
                    ok = ok.T
                shape = [1] * self.order
                shape[min(later, earlier)], shape[max(later, earlier)] = ok.shape
                ok = ok.reshape(shape)
                mask = ok if mask is None else mask & ok
            s = s.masked_fill(~mask, float("-inf"))
        return self.apply_masks(s, z0, i0, spans)

    def apply_masks(self, s: torch.Tensor, z0: int, i0: int, spans) -> torch.Tensor:
        """Add the key biases of each slot and the general mask's tile to a score tile."""
        ops, nk = self.ops, self.order - 1
        z1 = z0 + s.shape[0]
        for slot, bias in enumerate(ops.key_bias):
            if bias is not None:
                shape = [s.shape[0], 1] + [1] * nk
                shape[2 + slot] = spans[slot][1] - spans[slot][0]
                s = s + bias[z0:z1, spans[slot][0]: spans[slot][1]].reshape(shape).to(s.dtype)
        if ops.attn_mask is not None:
            tile = ops.attn_mask.tile(z0, z1, i0, i0 + s.shape[1], spans, s.dtype)
            s = s.masked_fill(tile, float("-inf")) if tile.dtype == torch.bool else s + tile
        return s

    def _polynomial_scores(self, tiles: list[torch.Tensor]) -> torch.Tensor:
        """sum_t coefficient_t * term_t over a tile of key tuples: (Z', bq, b_1, ..., b_{k-1})."""
        spec = self.ops.spec
        full = [tiles[0].shape[0]] + [t.shape[1] for t in tiles]
        total = None
        for term, expr in zip(spec.terms, self.term_exprs):
            t = contract(expr, *term_operands(spec, self.ops.sizes, tiles, term))
            order = sorted(range(term.order), key=lambda a: term.slots[a])
            t = t.permute(0, *(1 + a for a in order))  # the term's slot axes in global slot order
            shape = [full[0]] + [full[1 + s] if s in term.slots else 1 for s in range(self.order)]
            t = t.reshape(shape) * term.coefficient
            total = t if total is None else total + t
        return total.expand(full)

    def values(self, p: torch.Tensor, vs: list[torch.Tensor]) -> torch.Tensor:
        if self.bilinear:
            return torch.bmm(p, vs[0])
        if self.trilinear:  # p against the pair products v_j * v'_k: one GEMM over the key pairs
            return torch.bmm(p.reshape(p.shape[0], p.shape[1], -1), _pair_products(*vs))
        return contract(self.value_expr, p, *vs)


def _pair_products(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x_i * y_j entrywise for every pair (i, j) of rows: (Z, a, f), (Z, b, f) -> (Z, a b, f)."""
    return (x[:, :, None, :] * y[:, None, :, :]).reshape(x.shape[0], x.shape[1] * y.shape[1], x.shape[2])


def _exp_shifted(s: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(s - shift) for a fresh score tile: in place (a tile is the largest tensor of a step, and
    a new one of its size costs more in page faults than the op itself), except inside a graph
    (double backward), where the reductions of s keep it for their own gradient."""
    return torch.exp(s - shift) if s.requires_grad else s.sub_(shift).exp_()


def _slices(engine: TileEngine, Z: int):
    for z0 in range(0, Z, engine.batch_chunk):
        z1 = min(Z, z0 + engine.batch_chunk)
        for i0 in range(0, engine.ops.n, engine.query_chunk):
            yield z0, z1, i0, min(engine.ops.n, i0 + engine.query_chunk)


def stream_forward(engine: TileEngine, q, keys, values, rel) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax forward. Returns out (Z, n, *vals) and lse (Z, n)."""
    ops = engine.ops
    Z = q.shape[0]
    out = q.new_empty(Z, ops.n, *ops.out_value_shape)
    lse = q.new_empty(Z, ops.n)
    nk = engine.order - 1
    for z0, z1, i0, i1 in _slices(engine, Z):
        qc = q[z0:z1, i0:i1]
        m_run = l_run = acc = None
        extra = (1,) * len(ops.out_value_shape)
        for spans in engine.blocks(i0, i1):
            ks = [keys[s][z0:z1, a:b] for s, (a, b) in enumerate(spans)]
            vs = [values[s][z0:z1, a:b] for s, (a, b) in enumerate(spans)]
            s = engine.scores(qc, ks, rel, i0, spans, z0)
            flat = s.reshape(s.shape[0], s.shape[1], -1)
            m_new = flat.amax(-1) if m_run is None else torch.maximum(m_run, flat.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = _exp_shifted(s, m_safe.reshape(*m_safe.shape, *([1] * nk)))
            if m_run is None:  # the first block: nothing to rescale
                l_run, acc = p.reshape(flat.shape).sum(-1), engine.values(p, vs)
            else:
                alpha = torch.exp(m_run - m_safe)
                l_run = l_run * alpha + p.reshape(flat.shape).sum(-1)
                acc = acc * alpha.reshape(*alpha.shape, *extra) + engine.values(p, vs)
            m_run = m_new
        if m_run is None:  # every key block lies in the future of these queries (causal)
            m_run = qc.new_full((z1 - z0, i1 - i0), float("-inf"))
            l_run = qc.new_zeros((z1 - z0, i1 - i0))
            acc = qc.new_zeros((z1 - z0, i1 - i0, *ops.out_value_shape))
        # a row with no visible key tuple (all masked) has l = 0 and acc = 0: output 0, lse -inf
        l_safe = torch.where(l_run > 0, l_run, torch.ones_like(l_run))
        out[z0:z1, i0:i1] = acc / l_safe.reshape(*l_run.shape, *extra)
        lse[z0:z1, i0:i1] = m_run + torch.log(l_run)
    return out, lse


def stream_backward(engine: TileEngine, q, keys, values, rel, d_out, lse, delta, dq, dks, dvs, drel) -> None:
    """Recomputing backward of one (queries, keys) pair: adds the gradients of every tile into
    ``dq``, ``dks``, ``dvs`` and ``drel`` (None without W). ``lse`` and ``delta`` = <dO_i, out_i>
    are per-row statistics of the *whole* softmax, so the keys may be one block of a longer
    sequence (the ring backward of ``ta.distributed``)."""
    nk = engine.order - 1
    Z = q.shape[0]
    for z0, z1, i0, i1 in _slices(engine, Z):
        L = lse[z0:z1, i0:i1].reshape(z1 - z0, i1 - i0, *([1] * nk))
        L = torch.where(torch.isinf(L), torch.zeros_like(L), L)  # rows that see no key: p = 0
        Dd = delta[z0:z1, i0:i1].reshape(L.shape)
        dO = d_out[z0:z1, i0:i1]
        if engine.bilinear and rel is None:
            _bilinear_backward(engine, q, keys[0], values[0], dO, L, Dd, dq, dks[0], dvs[0], z0, z1, i0, i1)
            continue
        if engine.trilinear and rel is None:
            _trilinear_backward(engine, q, keys, values, dO, L, Dd, dq, dks, dvs, z0, z1, i0, i1)
            continue
        for spans in engine.blocks(i0, i1):
            # autograd runs on the two contractions only: the value contraction gives dP and the
            # value gradients, dS = p (dP - D) is formed in place, and the score graph takes dS
            with torch.enable_grad():
                qc = q[z0:z1, i0:i1].detach().requires_grad_(True)
                ks = [keys[s][z0:z1, a:b].detach().requires_grad_(True) for s, (a, b) in enumerate(spans)]
                vs = [values[s][z0:z1, a:b].detach().requires_grad_(True) for s, (a, b) in enumerate(spans)]
                rl = rel.detach().requires_grad_(True) if rel is not None else None
                s = engine.scores(qc, ks, rl, i0, spans, z0)
                p = _exp_shifted(s.detach(), L).requires_grad_(True)  # no node of the score graph keeps s
                dP, *gv = torch.autograd.grad(engine.values(p, vs), [p, *vs], dO)
                dS = dP.sub_(Dd).mul_(p.detach())
                del p
                gs = torch.autograd.grad(s, [qc, *ks] + ([rl] if rl is not None else []), dS, allow_unused=True)
            if gs[0] is not None:
                dq[z0:z1, i0:i1] += gs[0]
            for s_, (a, b) in enumerate(spans):
                if gs[1 + s_] is not None:
                    dks[s_][z0:z1, a:b] += gs[1 + s_]
                dvs[s_][z0:z1, a:b] += gv[s_]
            if rl is not None and gs[-1] is not None:
                drel += gs[-1]


def _bilinear_backward(engine: TileEngine, q, k, v, dO, L, Dd, dq, dk, dv, z0, z1, i0, i1) -> None:
    """The tiles of one query chunk for s = scale q k^T, out = p v: with p = exp(s - L) and
    dS = p (dO v^T - D), dq += scale dS k, dk += scale dS^T q, dv += p^T dO. The same gradient as the
    autograd graph of the general path, in four GEMMs (each adding into its gradient) and two
    in-place passes over the tile."""
    qc, scale = q[z0:z1, i0:i1], engine.scale
    for (a, b), in engine.blocks(i0, i1):
        kc, vc = k[z0:z1, a:b], v[z0:z1, a:b]
        p = _exp_shifted(engine.scores(qc, [kc], None, i0, ((a, b),), z0), L)
        dv[z0:z1, a:b].baddbmm_(p.transpose(1, 2), dO)  # each gradient accumulates inside its GEMM
        dS = torch.baddbmm(Dd, dO, vc.transpose(1, 2), beta=-1).mul_(p)
        del p
        dq[z0:z1, i0:i1].baddbmm_(dS, kc, alpha=scale)
        dk[z0:z1, a:b].baddbmm_(dS.transpose(1, 2), qc, alpha=scale)


def _trilinear_backward(engine: TileEngine, q, keys, values, dO, L, Dd, dq, dks, dvs, z0, z1, i0, i1) -> None:
    """The tiles of one query chunk for s_ijk = scale q_i . (k_j * k'_k), out_i = sum_jk p_ijk
    (v_j * v'_k). With M and V the pair products of the keys and of the values (one row per key pair
    (j, k)) and dS = p (dO V^T - D): dq += scale dS M, dM = scale dS^T q, dV = p^T dO, and each
    slot's gradient is its pair gradient times the other slot, summed over the other slot."""
    qc, scale = q[z0:z1, i0:i1], engine.scale
    Z, bq = qc.shape[:2]
    for (a1, b1), (a2, b2) in engine.blocks(i0, i1):
        k1, k2 = keys[0][z0:z1, a1:b1], keys[1][z0:z1, a2:b2]
        v1, v2 = values[0][z0:z1, a1:b1], values[1][z0:z1, a2:b2]
        bj, bk = k1.shape[1], k2.shape[1]
        p = _exp_shifted(engine.scores(qc, [k1, k2], None, i0, ((a1, b1), (a2, b2)), z0), L).view(Z, bq, bj * bk)
        dV = torch.bmm(p.transpose(1, 2), dO).view(Z, bj, bk, -1)
        dvs[0][z0:z1, a1:b1] += (dV * v2[:, None]).sum(2)
        dvs[1][z0:z1, a2:b2] += (dV.mul_(v1[:, :, None])).sum(1)
        del dV
        dS = torch.baddbmm(Dd.reshape(Z, bq, 1), dO, _pair_products(v1, v2).transpose(1, 2), beta=-1).mul_(p)
        del p
        dq[z0:z1, i0:i1].baddbmm_(dS, _pair_products(k1, k2), alpha=scale)
        dM = torch.bmm(dS.transpose(1, 2), qc).mul_(scale).view(Z, bj, bk, -1)
        del dS
        dks[0][z0:z1, a1:b1] += (dM * k2[:, None]).sum(2)
        dks[1][z0:z1, a2:b2] += (dM.mul_(k1[:, :, None])).sum(1)


def backward_buffers(q, keys, values, rel, out, d_out):
    """What a recomputing backward starts from: D_i = <dO_i, out_i> and zeroed gradients of q,
    the keys, the values and W (None without)."""
    vdims = tuple(range(2, out.ndim))
    delta = (d_out * out).sum(dim=vdims) if vdims else d_out * out
    return (delta, torch.zeros_like(q), [torch.zeros_like(k) for k in keys], [torch.zeros_like(v) for v in values],
            torch.zeros_like(rel) if rel is not None else None)


class ExactAttentionFunction(torch.autograd.Function):
    """Exact attention with a recomputing backward (memory O(n * block) in training too)."""

    @staticmethod
    def forward(ctx, engine: TileEngine, nk: int, q, *rest):
        keys, values = list(rest[:nk]), list(rest[nk: 2 * nk])
        rel = rest[2 * nk] if len(rest) > 2 * nk else None
        with torch.no_grad():
            out, lse = stream_forward(engine, q, keys, values, rel)
        ctx.engine, ctx.nk, ctx.has_rel = engine, nk, rel is not None
        ctx.save_for_backward(q, *keys, *values, *([rel] if rel is not None else []), out, lse)
        return out

    @staticmethod
    @full_precision_backward
    def backward(ctx, d_out):
        engine, nk = ctx.engine, ctx.nk
        saved = ctx.saved_tensors
        q, keys, values = saved[0], list(saved[1: 1 + nk]), list(saved[1 + nk: 1 + 2 * nk])
        rel = saved[1 + 2 * nk] if ctx.has_rel else None
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            def forward(q_, *rest):
                return (stream_forward(engine, q_, list(rest[:nk]), list(rest[nk: 2 * nk]),
                                       rest[2 * nk] if rel is not None else None)[0],)

            inputs = [q, *keys, *values] + ([rel] if rel is not None else [])
            return (None, None, *create_graph_grads(forward, inputs, [d_out]))
        out, lse = saved[-2], saved[-1]
        delta, dq, dks, dvs, drel = backward_buffers(q, keys, values, rel, out, d_out)
        stream_backward(engine, q, keys, values, rel, d_out, lse, delta, dq, dks, dvs, drel)
        return (None, None, dq, *dks, *dvs, *([drel] if rel is not None else []))


def dense_weights(engine: TileEngine, q, keys, values, rel) -> torch.Tensor:
    """The attention weights (Z, n, m_1, ..., m_{k-1}): one streamed pass for the per-row
    log-sum-exp, then each tile's exp(s - L). Holds n * prod(m) numbers, unlike the forward."""
    ops = engine.ops
    _, lse = stream_forward(engine, q, keys, values, rel)
    weights = q.new_zeros(q.shape[0], ops.n, *ops.ms)
    nk = engine.order - 1
    for z0, z1, i0, i1 in _slices(engine, q.shape[0]):
        L = lse[z0:z1, i0:i1].reshape(z1 - z0, i1 - i0, *([1] * nk))
        L = torch.where(torch.isinf(L), torch.zeros_like(L), L)
        for spans in engine.blocks(i0, i1):
            ks = [keys[s][z0:z1, a:b] for s, (a, b) in enumerate(spans)]
            tile = _exp_shifted(engine.scores(q[z0:z1, i0:i1], ks, rel, i0, spans, z0), L)
            weights[(slice(z0, z1), slice(i0, i1), *(slice(a, b) for a, b in spans))] = tile
    return weights


_FOLDED = Spec("relative_folded", "id,jd->ij")


class ExactBackend(Backend):
    """Exact softmax attention for every spec, streamed with online softmax."""

    name = "exact"
    certified = True
    applies_masks = True
    # the tile backward (ExactAttentionFunction) and the tree and triangle messages are
    # autograd.Functions under full_precision_backward; around them only entrywise ops
    precise_backward = True

    def weights(self, plan, ops: Operands) -> torch.Tensor:
        """The dense attention weights (Z, n, m_1, ..., m_{k-1}), without gradient."""
        dtype = ops.dtype
        ops = ops.to(_DTYPES[plan.exact_dtype])  # float64 where float32 could overflow
        with torch.no_grad():
            return dense_weights(TileEngine(ops, plan.request.memory_budget), ops.q, list(ops.keys),
                                 list(ops.values), ops.rel).to(dtype)

    def run(self, plan, ops: Operands) -> torch.Tensor:
        dtype = ops.dtype
        ops = ops.to(_DTYPES[plan.exact_dtype])  # float64 where float32 could overflow
        if plan.rel_folded:  # the same W at every offset: pairwise attention on q W
            ops = dataclasses.replace(ops, spec=_FOLDED, q=ops.q @ ops.rel[0], rel=None)
        path = ops.spec.exact_path
        if path == "tree" and ops.attn_mask is None:  # key masks enter the messages as key biases
            return tree_exact(ops, plan.request.memory_budget).to(dtype)
        if path == "triangle" and ops.attn_mask is None and not ops.key_bias:
            return triangle_exact(ops, plan.request.memory_budget).to(dtype)
        engine = TileEngine(ops, plan.request.memory_budget)
        nk = ops.order - 1
        args = ops.tensors
        # need_grad=False only skips the gradient-aware degree choice; it never detaches the output
        if ops.tracks_grad:
            return ExactAttentionFunction.apply(engine, nk, *args).to(dtype)
        with torch.no_grad():
            return stream_forward(engine, ops.q, list(ops.keys), list(ops.values), ops.rel)[0].to(dtype)
