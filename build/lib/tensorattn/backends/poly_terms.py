"""The polynomial method for attention polynomials, by the method the plan chose.

Every term's exp is replaced by its certified polynomial P_t, written as features with all of its
coefficients on one side, so the weight of a key tuple, prod_t P_t, is a tensor network over the
slots' tokens and the terms' feature indices (docs/poly-attention.md). Besides contracting that
network with opt_einsum (``network_attention`` in backends/poly.py), three methods use structure:

* ``moments``: a slot in terms t_1..t_m carries prod_t phi_t(x)[r_t], one monomial of the merged
  degree sum g_t, so each key slot reduces to one GEMM Phi^T [v | 1] in the merged basis plus an
  index gather, and opt_einsum contracts the small core over the terms' rank indices;
* ``tree``: message passing toward the query with a polynomial edge (normalized per message, like
  the exact one), chunked over tokens; causal by blocked prefix states;
* ``triangle``: causal Strassen attention with prefix states over both key slots (the pair state
  is updated by rank-|chunk| terms, never an r^3 product).

Methods that take one vector per slot (moments, triangle) need every term to be the inner product
of two slots' whole arrays (``Spec.pair_terms``); the tree method takes each edge's vectors from
``pairwise_form``, with scale and coefficient folded in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import opt_einsum
import torch
import torch.nn.functional as F

from ..approx.features import augment, feature_map, feature_map_t, monomial_tables, query_weights, rank_for
from ..approx.polynomials import Approximant, get_approximant
from ..inputs import Operands
from .structured import pairwise_form


@dataclass(frozen=True)
class TermPlan:
    """One inner-product term scale * coef * <x_a, x_b> under its certified polynomial."""

    a: int
    b: int
    coef: float
    beta: float
    degree: int
    d: int

    @property
    def rank(self) -> int:
        return rank_for(self.d, self.degree)


@dataclass(frozen=True)
class PolyPlan:
    terms: tuple[TermPlan, ...]
    scale: float
    approximant: Approximant

    def coefficients(self, t: TermPlan) -> np.ndarray:
        return self.approximant.coefficients(t.beta, t.degree)


def pair_plan(plan, ops: Operands) -> PolyPlan:
    """The plan's certified degrees for a spec whose terms are inner products of whole slot arrays."""
    pairs = ops.spec.pair_terms
    d = ops.D
    terms = tuple(TermPlan(a, b, coef, st.beta, tc.degree, d)
                  for (a, b, coef), st, tc in zip(pairs, plan.problem.terms, plan.certificate.terms))
    return PolyPlan(terms, ops.scale, get_approximant(plan.approximant))


def _weights(plan: PolyPlan, t: TermPlan, dtype, device) -> torch.Tensor:
    """Per-monomial weights c_g * (scale coef)^g * g!/alpha! (the a side of the term)."""
    w = query_weights(plan.coefficients(t), plan.scale * t.coef, t.d, t.degree)
    return torch.as_tensor(w, dtype=dtype, device=device)


@lru_cache(maxsize=256)
def _network(expr: str, shapes: tuple[tuple[int, ...], ...]):
    return opt_einsum.contract_expression(expr, *shapes, optimize="dp")


@lru_cache(maxsize=64)
def monomial_exponents(D: int, g: int) -> np.ndarray:
    """Exponent vectors (r, D) of the features of ``feature_map(x, g)``, in its order."""
    tab = monomial_tables(D, g)
    levels = [np.zeros((1, D), np.int64)]
    for t in range(1, g + 1):
        ex = levels[-1][tab.parents[t]].copy()
        ex[np.arange(ex.shape[0]), tab.coords[t]] += 1
        levels.append(ex)
    return np.concatenate(levels)


@lru_cache(maxsize=64)
def merge_index(D: int, degrees: tuple[int, ...]) -> np.ndarray:
    """idx[r_1, ..., r_m] = index of x^(alpha_r1 + ... + alpha_rm) in the basis of degree sum(degrees).

    A slot that appears in m terms carries the product of m monomials of its own vector, which is
    ONE monomial of the merged degree: prod_t x^alpha_t = x^(sum alpha_t), exactly."""
    G = sum(degrees)
    base = G + 1
    if D * math.log2(base) > 62:
        raise ValueError(f"merged basis too large to index (d={D}, degree {G}); use method='network'")
    enc = base ** np.arange(D, dtype=np.int64)
    keys = monomial_exponents(D, G) @ enc
    order = np.argsort(keys)
    total = np.zeros([rank_for(D, g) for g in degrees], np.int64)
    for axis, g in enumerate(degrees):
        shape = [1] * len(degrees)
        shape[axis] = -1
        total = total + (monomial_exponents(D, g) @ enc).reshape(shape)
    pos = np.searchsorted(keys[order], total)
    return order[pos]



def _slot_terms(plan: PolyPlan, s: int) -> list[int]:
    return [i for i, t in enumerate(plan.terms) if s in (t.a, t.b)]


def moments_attention(xs, values, plan: PolyPlan, dtype, memory_budget: int):
    """Non-causal polynomial attention by per-slot moments (any structure).

    Each slot's position index appears only in its own terms' features and its value, so it can be
    summed out first. A slot in terms t_1..t_m carries prod_t phi_t(x)[r_t] = w * x^(alpha_r1 + ...),
    one monomial of the merged degree G_s = sum g_t, so with Phi_s = feature_map(x_s, G_s):

        key slot:  W_s[r_1..r_m, E] = w(r) * M_s[idx(r_1..r_m), E],   M_s = Phi_s^T [v_s | 1]
        core:      C[r's of slot 0, E] = opt_einsum contraction of the W_s over the rank indices
        query:     out_i = Phi_0(q_i) . scatter_add_{idx}(w(r) * C)       (R_0 x E)

    Cost: sum_s N_s R_s E (R_s = C(d + G_s, d)) + the core (e.g. r^3 E for the triangle), instead
    of N r^2 E per slot: a large gain when d is small (d = 4: R = 715-1001 vs r^2 = 8820-15876).
    Memory O(chunk R_s + prod_t r_t E) (features built chunk by chunk)."""
    S = len(xs)
    d = plan.terms[0].d
    dt = dtype or xs[0].dtype
    Z = xs[0].shape[0]
    E = values[0].shape[-1] + 1
    sym = opt_einsum.get_symbol
    rank_sym = [sym(2 + i) for i in range(len(plan.terms))]
    zs, Es = sym(0), sym(1)

    def weighted(tensor, s, t_ids, first_axis):
        # multiply by the query weights of every term whose weighted (a) side is slot s
        for ax, ti in enumerate(t_ids):
            t = plan.terms[ti]
            if t.a == s:
                w = _weights(plan, t, dt, tensor.device)
                shape = [1] * tensor.ndim
                shape[first_axis + ax] = -1
                tensor = tensor * w.reshape(shape)
        return tensor

    def features_chunks(x, G):
        R = rank_for(d, G)
        chunk = max(16, memory_budget // (4 * x.element_size() * Z * (R + E)))
        for p0 in range(0, x.shape[1], chunk):
            yield p0, feature_map_t(x[:, p0: p0 + chunk].to(dt).transpose(1, 2).contiguous(), G)  # (Z, R, c)

    ops, subs = [], []
    for s in range(1, S):
        t_ids = _slot_terms(plan, s)
        degs = tuple(plan.terms[ti].degree for ti in t_ids)
        G = sum(degs)
        vaT = augment(values[s - 1].to(dt)).transpose(1, 2)  # (Z, E, N)
        MT = torch.zeros(Z, E, rank_for(d, G), dtype=dt, device=xs[0].device)
        for p0, U in features_chunks(xs[s], G):
            MT = MT.baddbmm(vaT[:, :, p0: p0 + U.shape[-1]], U.transpose(1, 2))  # (Z, E, R): reads U contiguously
        idx = torch.as_tensor(merge_index(d, degs), device=MT.device)
        W = MT.transpose(1, 2)[:, idx.reshape(-1)].reshape(Z, *idx.shape, E)
        ops.append(weighted(W, s, t_ids, 1))
        subs.append(zs + "".join(rank_sym[ti] for ti in t_ids) + Es)
    q_ids = _slot_terms(plan, 0)
    expr = ",".join(subs) + "->" + zs + "".join(rank_sym[ti] for ti in q_ids) + Es
    core_fn = _network(expr, tuple(tuple(o.shape) for o in ops))
    core = weighted(core_fn(*ops, backend="torch"), 0, q_ids, 1)
    degs0 = tuple(plan.terms[ti].degree for ti in q_ids)
    idx0 = torch.as_tensor(merge_index(d, degs0), device=core.device).reshape(-1)
    G0 = sum(degs0)
    CqT = torch.zeros(Z, E, rank_for(d, G0), dtype=dt, device=core.device)
    CqT.index_add_(2, idx0, core.reshape(Z, -1, E).transpose(1, 2))
    outs = [torch.bmm(CqT, U) for _, U in features_chunks(xs[0], G0)]  # (Z, E, c)
    res = torch.cat(outs, 2).transpose(1, 2)
    return res[..., :-1] / res[..., -1:]



def _chunk(Z: int, r: int, E: int, elem: int, budget: int) -> int:
    return max(16, budget // (4 * elem * Z * (r + E)))


def _blocked(t: torch.Tensor, nb: int, Cb: int) -> torch.Tensor:
    """(Z, L, m) -> (Z, nb, m, Cb) contiguous, zero-padded to nb whole blocks of Cb tokens."""
    pad = nb * Cb - t.shape[1]
    t = F.pad(t, (0, 0, 0, pad)) if pad else t
    return t.reshape(t.shape[0], nb, Cb, t.shape[-1]).transpose(2, 3).contiguous()


def _features_t(x: torch.Tensor, g: int, dt) -> torch.Tensor:
    """Tokens-last features (Z, r, c) from a contiguous tokens-last copy of x (Z, c, d)."""
    return feature_map_t(x.to(dt).transpose(1, 2).contiguous(), g)


def poly_edge(xu, xc, w, bias, g, qw, causal, off, budget, chunk=None, block=64, feats_u=None, feats_c=None):
    """Polynomial pairwise message: (value message (Z, Nu, e), lse (Z, Nu)).

    Weights P(s_uk) e^{b_k} with P(s) = phi(x_u) . psi(x_c) (qw folded into the key state);
    the bias is shifted by its max so e^{b - bmax} <= 1, and added back to the lse.
    Non-causal: state = psi_c^T ([w | 1] e^{b - bmax}) accumulated over key chunks (Z, r, E), then
    the queries in chunks. Causal (k <= i + off): blocked causal linear attention - keys aligned
    with the queries, per block of ``block`` tokens a key state (E x r), exclusive prefix sums of
    the block states for the earlier blocks, and a masked block x block product inside the block;
    vectorized over the blocks of a chunk (no Python loop over blocks).
    feats_u / feats_c: optional callables (a, b) -> tokens-last features (Z, r, b - a) of x_u / x_c
    (non-causal path), e.g. slices of features cached across the edges that share a slot.
    Layout: features are tokens-last (Z, r, c) and the state is kept transposed (Z, E, r), so both
    skinny GEMMs read the feature buffer contiguously (~5-20x faster than the other orientation).
    """
    Z, Nu, _ = xu.shape
    Nc, e = xc.shape[1], w.shape[-1]
    dt = qw.dtype
    wa = augment(w.to(dt))
    if bias is not None:
        b = bias.to(dt)
        bmax = b.amax(-1, keepdim=True)
        bmax = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
        wa = wa * torch.exp(b - bmax)[..., None]
    else:
        bmax = torch.zeros(Z, 1, dtype=dt, device=xu.device)
    waT = wa.transpose(1, 2)  # (Z, E, Nc)
    r = qw.shape[0]
    C = chunk or _chunk(Z, r, e + 1, qw.element_size(), budget)  # tokens per feature buffer
    stateT = torch.zeros(Z, e + 1, r, dtype=dt, device=xu.device)  # sum_k [w|1]_k psi(k)^T

    def add_keys(stT, a, b_):
        U = feats_c(a, b_) if feats_c is not None else _features_t(xc[:, a:b_], g, dt)  # (Z, r, p)
        return stT.baddbmm(waT[:, :, a:b_], U.transpose(1, 2)), U

    outs = []
    if not causal:
        for k0 in range(0, Nc, C):
            stateT, _ = add_keys(stateT, k0, min(Nc, k0 + C))
        stateT = stateT * qw
        for i0 in range(0, Nu, C):
            Uq = feats_u(i0, min(Nu, i0 + C)) if feats_u is not None else _features_t(xu[:, i0: i0 + C], g, dt)
            outs.append(torch.bmm(stateT, Uq))  # (Z, E, c)
    else:
        # keys k < off are visible to every query; the others are aligned with the queries
        # (aligned key i' = k - off is visible to query i iff i' <= i), zero weight where k is
        # out of range. Then blocked causal linear attention, vectorized over blocks.
        lo = max(0, min(Nc, off))
        if lo > 0:
            stateT, _ = add_keys(stateT, 0, lo)
        idx = torch.arange(Nu, device=xu.device) + off
        valid = (idx >= 0) & (idx < Nc)
        idx = idx.clamp(0, max(0, Nc - 1))
        xk_al = xc[:, idx]
        waT_al = waT[:, :, idx] * valid.to(dt)
        Cb = block  # the intra-block product costs Cb * r per query
        S = max(Cb, (C // Cb) * Cb)  # super-chunk: features are built S tokens at a time
        wa_al = waT_al.transpose(1, 2)  # (Z, Nu, E)
        tri = torch.triu(torch.ones(Cb, Cb, dtype=dt, device=xu.device))  # [key, query]: key <= query
        for s0 in range(0, Nu, S):
            s1 = min(Nu, s0 + S)
            L = s1 - s0
            nb = -(-L // Cb)

            # features straight into the blocked tokens-last layout (Z, nb, r, Cb)
            Uqb = feature_map_t(_blocked(xu[:, s0:s1].to(dt), nb, Cb), g)
            Ukb = feature_map_t(_blocked(xk_al[:, s0:s1].to(dt), nb, Cb), g)
            Wb = _blocked(wa_al[:, s0:s1], nb, Cb)  # (Z, nb, E, Cb)
            Sb = torch.matmul(Wb, Ukb.transpose(2, 3))  # (Z, nb, E, r): each block's key state
            prefix = stateT[:, None] + torch.cumsum(Sb, 1) - Sb  # keys of the earlier blocks
            resT = torch.matmul(prefix * qw, Uqb)  # (Z, nb, E, Cb)
            A = torch.matmul((Ukb * qw[:, None]).transpose(2, 3), Uqb)  # (Z, nb, Cb keys, Cb queries)
            resT = resT.add_(torch.matmul(Wb, A.mul_(tri)))
            stateT = stateT + Sb.sum(1)
            outs.append(resT.transpose(2, 3).reshape(Z, nb * Cb, e + 1)[:, :L].transpose(1, 2))
    res = torch.cat(outs, 2).transpose(1, 2)  # (Z, Nu, E)
    den = res[..., -1]
    if causal and off < 0:  # queries i < -off see no key at all: out 0, lse -inf (as the exact edge)
        empty = torch.arange(Nu, device=xu.device) + off < 0
        den = torch.where(empty, torch.ones_like(den), den)
        return (torch.where(empty[:, None], 0.0, res[..., :-1] / den[..., None]),
                torch.where(empty, float("-inf"), torch.log(den) + bmax))
    return res[..., :-1] / den[..., None], torch.log(den) + bmax



def poly_strassen_causal(xs, values, plan: PolyPlan, causal_offset: int, dtype, chunk: int = 64):
    """Causal (j <= i + off, k <= i + off) polynomial Strassen attention with prefix states.

    With F = phi_01(q), G = psi_01(k1), H = phi_12(k1), L = psi_12(k2), N = phi_02(q), M = psi_02(k2)
    (so the tuple weight is (F_i.G_j)(H_j.L_k)(N_i.M_k)) and augmented values v1a, v2a:

        num_i = sum_{j <= i, k <= i} (F_i.G_j)(H_j.L_k)(N_i.M_k) v1a_j v2a_k.

    The causal state for query i is a prefix over BOTH j and k. Keep, for the keys before the current
    chunk (j < jb, k < kb):
        S1[r,s,E] = sum_j G_jr H_js v1a_jE,   S2[s,t,E] = sum_k L_ks M_kt v2a_kE,
        C0[r,t,E] = sum_{j,k} (...) = sum_s S1[r,s,E] S2[s,t,E]      (the pair state, r^2 E)
    For a chunk of queries, (j, k) splits into 4 parts: (old j, old k) = F_i C0 N_i;
    (old j, new k) via P_i = F_i S1 against the chunk's k; (new j, old k) via Q_i = S2 N_i against
    the chunk's j; (new j, new k) = a small exact-style triangle inside the chunk with masks. The pair
    state is updated without any r^3 product:
        C0 <- C0 + dS1 . S2_new + S1_old . dS2,   (dS1 . S2_new)[r,t,E] = sum_j G_jr v1a_jE (H_j S2_new)[t,E]
    (dS1, dS2 are rank-|chunk| updates). Cost O(n r^2 e + n chunk (r + chunk) e), memory O(r^2 e +
    chunk r e + chunk^2 e). Batch: xs, values (Z, N, .).
    """
    q, k1, k2 = xs
    v1, v2 = values
    dt = dtype or q.dtype
    by_pair = {(t.a, t.b): t for t in plan.terms}
    t01, t12, t02 = by_pair[(0, 1)], by_pair[(1, 2)], by_pair[(0, 2)]
    w01, w12, w02 = (_weights(plan, t, dt, q.device) for t in (t01, t12, t02))
    Z, n, _ = q.shape
    n1, n2 = k1.shape[1], k2.shape[1]
    v1a, v2a = augment(v1.to(dt)), augment(v2.to(dt))
    E = v1a.shape[-1]
    r, s_, t_ = t01.rank, t12.rank, t02.rank
    S1 = q.new_zeros(Z, r, s_, E, dtype=dt)
    S2 = q.new_zeros(Z, s_, t_, E, dtype=dt)
    C0 = q.new_zeros(Z, r, t_, E, dtype=dt)
    jb = kb = 0
    off = causal_offset
    outs = []

    def feats(x, a, b, g):
        return feature_map(x[:, a:b].to(dt), g)

    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        pos = torch.arange(i0, i1, device=q.device)
        fq = feats(q, i0, i1, t01.degree)
        F = fq * w01
        N = (fq if t02.degree == t01.degree else feats(q, i0, i1, t02.degree)) * w02
        je, ke = max(0, min(n1, i1 + off)), max(0, min(n2, i1 + off))
        # (old j, old k)
        num = torch.einsum("zir,zrtE,zit->ziE", F, C0, N)
        if je > jb:
            G, v1c = feats(k1, jb, je, t01.degree), v1a[:, jb:je]
            H = (G if t12.degree == t01.degree else feats(k1, jb, je, t12.degree)) * w12
            FG = torch.bmm(F, G.transpose(1, 2)).masked_fill_(
                torch.arange(jb, je, device=q.device)[None, :] > pos[:, None] + off, 0.0)  # (Z, c, cj)
        if ke > kb:
            L, v2c = feats(k2, kb, ke, t12.degree), v2a[:, kb:ke]
            M = L if t02.degree == t12.degree else feats(k2, kb, ke, t02.degree)
            NM = torch.bmm(N, M.transpose(1, 2)).masked_fill_(
                torch.arange(kb, ke, device=q.device)[None, :] > pos[:, None] + off, 0.0)  # (Z, c, ck)
            # (old j, new k): sum_k NM_ik v2a_kE (P_i L_k)_E, P_i = F_i S1
            P = torch.einsum("zir,zrsE->zisE", F, S1)
            PL = torch.einsum("zisE,zks->zikE", P, L)
            num = num + torch.einsum("zik,zkE,zikE->ziE", NM, v2c, PL)
        if je > jb:
            # (new j, old k): sum_j FG_ij v1a_jE (H_j Q_i)_E, Q_i = S2 N_i
            Q = torch.einsum("zstE,zit->zisE", S2, N)
            HQ = torch.einsum("zisE,zjs->zijE", Q, H)
            num = num + torch.einsum("zij,zjE,zijE->ziE", FG, v1c, HQ)
        if je > jb and ke > kb:
            # (new j, new k): sum_jk FG_ij HL_jk NM_ik v1a_jE v2a_kE
            HL = torch.bmm(H, L.transpose(1, 2))
            T = torch.einsum("zjk,zik,zkE->zijE", HL, NM, v2c)
            num = num + torch.einsum("zij,zjE,zijE->ziE", FG, v1c, T)
        outs.append(num[..., :-1] / num[..., -1:])
        # state updates (keys of this chunk become old)
        dS1 = torch.einsum("zjr,zjs,zjE->zrsE", G, H, v1c) if je > jb else None
        dS2 = torch.einsum("zks,zkt,zkE->zstE", L, M, v2c) if ke > kb else None
        if dS2 is not None:
            C0 = C0 + torch.einsum("zrsE,zks,zkt,zkE->zrtE", S1, L, M, v2c)  # S1_old . dS2
            S2 = S2 + dS2
        if dS1 is not None:
            C0 = C0 + torch.einsum("zjr,zjE,zjs,zstE->zrtE", G, v1c, H, S2)  # dS1 . S2_new
            S1 = S1 + dS1
        jb, kb = max(jb, je), max(kb, ke)
    return torch.cat(outs, 1)




# ---- front doors used by the poly backend ---------------------------------------------------------

def _flat_values(ops: Operands, dtype) -> list[torch.Tensor]:
    Z = ops.q.shape[0]
    return [v.reshape(Z, v.shape[1], -1).to(dtype) for v in ops.values]


def moments_poly(plan, ops: Operands, dtype: torch.dtype) -> torch.Tensor:
    xs = [x.to(dtype) for x in (ops.q, *ops.keys)]
    return moments_attention(xs, _flat_values(ops, dtype), pair_plan(plan, ops), dtype, plan.request.memory_budget)


def triangle_poly_causal(plan, ops: Operands, dtype: torch.dtype) -> torch.Tensor:
    xs = [x.to(dtype) for x in (ops.q, *ops.keys)]
    off = ops.q_offset - (ops.k_offsets[0] if ops.k_offsets else 0)
    return poly_strassen_causal(xs, _flat_values(ops, dtype), pair_plan(plan, ops), off, dtype)


def tree_poly(plan, ops: Operands, dtype: torch.dtype) -> torch.Tensor:
    """Message passing toward the query with the polynomial edge of each edge's term (one term per
    edge; one-slot terms are exact per-token biases)."""
    spec = ops.spec
    form = pairwise_form(ops)
    parent = spec.structure.parent
    offsets = [ops.q_offset] + [ops.k_offsets[s] if ops.k_offsets else 0 for s in range(ops.order - 1)]
    approx = get_approximant(plan.approximant)
    term_of = {tuple(sorted(t.slots)): i for i, t in enumerate(spec.terms) if t.order == 2}
    values = [None, *_flat_values(ops, dtype)]
    budget = plan.request.memory_budget

    def message(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, bias = values[c], form.bias[c]
        bias = None if bias is None else bias.to(dtype)
        for g in (s for s, p in enumerate(parent) if p == c):
            mv, ml = message(g)
            w = w * mv
            bias = ml if bias is None else bias + ml
        u = parent[c]
        key = (min(u, c), max(u, c))
        xu, xc = form.edges[key]
        if u > c:
            xu, xc = xc, xu
        t = term_of[key]
        stats, tc = plan.problem.terms[t], plan.certificate.terms[t]
        # scale and coefficient are folded into the edge vectors: weights for scale 1
        qw = torch.as_tensor(query_weights(approx.coefficients(stats.beta, tc.degree), 1.0, xu.shape[-1], tc.degree),
                             dtype=dtype, device=xu.device)
        return poly_edge(xu.to(dtype), xc.to(dtype), w, bias, tc.degree, qw, ops.causal, offsets[u] - offsets[c],
                         budget)

    out = None
    for c in (s for s, p in enumerate(parent) if p == 0):
        mv, _ = message(c)
        out = mv if out is None else out * mv
    return out
