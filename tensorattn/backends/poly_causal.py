"""Chunked causal factorized attention: the body of ``FactorizedAttention.causal``
(docs/design.md#causal-poly).

Semantics (identical to the current method): key j of slot s is visible to query i iff
j + key_offset <= i + q_offset; ``initial`` holds the states U_s^T [v_s | 1] of earlier keys (all
visible, for sequence parallelism); the combine is the value einsum, entrywise in the feature
index r, times the query weights; any order k, batch dim Z, float32/float64, autograd.

Shift the keys by o = q_offset - key_offset: key position p = j - o is visible to query i iff
p <= i. Keys with p < 0 are visible to every query (initial state); keys with p >= n to none.
Split positions 0..n-1 into blocks of b. For query i in block t each slot's state is

    S_s(i) = P_s + D_s(i),   P_s = state of all keys before block t (r x (e_s+1)),
                             D_s(i) = sum_{p in block t, p <= i} U_s[p] (x) a_s[p]   (a = [v | 1])

and the combine M is multilinear in the slots, so with T the set of slots that take their
intra-block part (inclusion-exclusion over the k-1 slots; 2^(k-1) terms)

    out_i = sum_T Uq[i] . M(P_{not T}, D_T(i)).

* T = {}: one GEMM M(P)^T (E+1, r) @ Uq^T (r, b) per block, like the non-causal path.
* T != {}: the polynomial "attention" tensor
      A_T[(j_t)_{t in T}, i, K] = sum_r w_r Uq[i,r] prod_{t in T} U_t[j_t, r] Q_T[r, K]
  with Q_T the other slots' previous states entrywise in r (only the value letters the value
  einsum still needs, K of them, plus a normalizer column; none when T is every slot), masked to
  j_t <= i, then contracted with the intra-block values a_t by the value einsum. Pairwise is the
  usual chunked linear-attention form: A^T = triu(U_k (U_q w)^T), out^T += [v|1]^T A^T.
  A_T is one GEMM per block after an elementwise (Hadamard) factor: either
    (i)  X_T = Uq w * prod_{t in T} U_t  (r x b^{|T|+1}), then Q_T^T @ X_T, or
    (ii) X_{T - last} * Q_T (r x K b^{|T|}), then U_last @ that,
  whichever writes fewer elements; X_S are shared between terms (X_{0} serves both T = {0} and
  T = {0, 1} of triple).

Cost per query token: r (sum_s (e_s+1) + E + 1) for the states and the inter-block GEMM (the
non-causal path's work) plus sum_T 2 b^|T| r K_T GEMM flops and the Hadamard factors for the
intra-block terms, plus per-block work (prefix sums, combine, Q_T: elementwise r x widths)
amortized over b tokens; ``choose_block`` minimizes a small model of these. Blocks are processed
in batches (one batched GEMM per term) sized from the engine's memory budget: memory is
O(budget), i.e. O(batch * (b r (e+1) + sum_T b^{|T|} r K_T)) with batch >= 1 block.

Optional hook ``eng.score_kernel(xq, [xk_t])``: the all-slots term is sum_r w_r Uq prod_t U_t,
which for polynomial features is exactly P(scale * s) of the raw operands
(``polynomial_score_kernel``): b^k (D + g) per block instead of b^k r, and pairwise then needs no
weighted query features at all.

The feature callables are applied to (Z * blocks, b, D) views, i.e. they must act per token
(true of every feature map in the package: polynomial, Taylor, FAVOR+ with its per-row query
stabilizer), so that each block's features are one contiguous tokens-last (r, b) buffer.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..approx.features import augment
from ..inputs import lasting
from .exact import contract

# --------------------------------------------------------------------------- term structure


class _Term:
    """One inclusion-exclusion term: the slots ``T`` that take their intra-block part.

    ``keep`` are the value letters of the other slots that survive into the attention tensor
    (letters of the output or of a slot in T); ``K`` = prod of their sizes + 1 normalizer column,
    or 1 when T is every slot (numerator and normalizer then share one tensor, ``shared``)."""

    def __init__(self, T: tuple[int, ...], nk: int, letters: tuple[str, ...], out: str, sizes: dict[str, int]):
        self.T = T
        self.others = tuple(s for s in range(nk) if s not in T)
        in_T = set("".join(letters[t] for t in T))
        seen: list[str] = []
        for s in self.others:
            for c in letters[s]:
                if c not in seen and (c in out or c in in_T):
                    seen.append(c)
        self.keep = "".join(seen)
        self.knum = math.prod(sizes[c] for c in self.keep)
        self.shared = not self.others
        self.K = 1 if self.shared else self.knum + 1
        # one other slot whose letters all survive, in order: Q_T is that slot's state as it is
        self.direct = len(self.others) == 1 and self.keep == letters[self.others[0]]


def _terms(eng) -> tuple[list[_Term], tuple[str, ...], str, dict[str, int], list[str]]:
    ve = eng.ops.spec.value_einsum
    letters = tuple(ve.value_letters)
    sizes = dict(eng.ops.value_sizes)
    free = [c for c in string.ascii_letters if c not in ve.expr]
    nk = len(letters)
    terms = [_Term(T, nk, letters, ve.out_letters, sizes)
             for h in range(1, nk + 1) for T in itertools.combinations(range(nk), h)]
    return terms, letters, ve.out_letters, sizes, free


@dataclass(frozen=True)
class _Schedule:
    """Per term: mode (i) (Hadamard over all of T, then Q^T @ X) or (ii) (X_{T-last} (x) Q, then
    U_last @ that); the Hadamard products X_S that must be built (shared between terms)."""

    hadamard: tuple[bool, ...]
    products: frozenset


def _schedule(terms: list[_Term], b: int, nk: int, kernel: bool = False) -> _Schedule:
    """With a score kernel the all-slots term needs no features (and no Hadamard factor)."""
    modes, products = [], set()
    for t in terms:
        # (i) writes b^{h+1} r, (ii) b^h r K (or nothing more when K = 1); X_{T-last} may be
        # needed by the all-slots term anyway
        mode = (not t.shared) and (b < t.K or (not kernel and t.T == tuple(range(nk - 1))))
        modes.append(mode)
        need = () if (t.shared and kernel) else (t.T if mode else t.T[:-1])
        for q in range(1, len(need) + 1):
            products.add(need[:q])
    return _Schedule(tuple(modes), frozenset(products))


# --------------------------------------------------------------------------- score kernel


#: 0-d tensors of recent scalars by (value, dtype, device): an op with a Python number wraps it in a
#: new tensor every call, which at small sizes costs as much as the op itself
_SCALARS: dict = {}


def scalar(x: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` as a 0-d tensor of ``dtype`` (float32 or float64: the value an op would round a Python
    number to), made once per (value, dtype, device)."""
    key = (x, dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        with lasting():
            t = _SCALARS[key] = torch.tensor(x, dtype=dtype, device=device)
    return t


def polynomial_score_kernel(coeffs, scale: float):
    """sum_r w_r Uq[i, r] prod_t U_t[j_t, r] of the certified polynomial features, computed from
    the scores: P(scale * sum_D xq[i] prod_t xk_t[j_t]) with P(s) = sum_t coeffs[t] s^t (Horner).

    Cost b^{h+1} (D + g) per block instead of b^{h+1} r. ``xq`` (B, b, D), ``xks`` h tensors
    (B, b_t, D); result in the layout (B, j_h, .., j_1, i) of the feature path. The non-causal
    direct form (``FactorizedAttention.direct``) calls it with all queries and keys of a chunk."""
    cs = np.asarray(coeffs, dtype=np.float64).tolist()  # Python floats
    tensors: dict = {}  # the coefficients as 0-d tensors of each dtype (addcmul adds a tensor)

    def kernel(xq: torch.Tensor, xks: list[torch.Tensor]) -> torch.Tensor:
        B, b, D = xq.shape
        X = xq * scalar(scale, xq.dtype, xq.device)  # D per token: cheaper than scaling the b^h scores
        for xk in xks[:-1]:  # (B, j_{t}, .., i, D), D innermost
            X = X.unsqueeze(1) * xk.reshape(B, xk.shape[1], *([1] * (X.dim() - 2)), D)
        lengths = [xk.shape[1] for xk in reversed(xks)]
        s = torch.bmm(xks[-1], X.reshape(B, -1, D).transpose(1, 2)).reshape(B, *lengths, b)
        if len(cs) == 1:
            return torch.full_like(s, cs[0])
        ct = tensors.get((s.dtype, s.device))
        if ct is None:
            with lasting():  # kept by the kernel
                ct = tensors[s.dtype, s.device] = torch.tensor(cs, dtype=s.dtype, device=s.device).unbind()
        # Horner, one op per degree: p <- c_t + p * s (in place unless autograd needs the steps)
        p = torch.addcmul(ct[-2], s, ct[-1])
        inplace = not (torch.is_grad_enabled() and s.requires_grad)
        for c in reversed(ct[:-2]):
            p = torch.addcmul(c, p, s, out=p) if inplace else torch.addcmul(c, p, s)
        return p

    kernel.degree = len(cs) - 1
    return kernel


# --------------------------------------------------------------------------- block size


#: cost-model constants, in GEMM-flop units per element: GAMMA for a memory-bound elementwise
#: element, F0 the extra feature-map cost of short (b-token) rows, B0 the GEMM efficiency knee,
#: CALL the fixed cost of one batched op per block. Fitted on the 2-core dev box (EPYC, AVX2).
GAMMA, F0, B0, CALL = 12.0, 8.0, 8.0, 3.0e3



def block_cost(b: int, rank: int, widths: list[int], E1: int, terms: list[_Term],
               kernel: tuple[int, int] | None = None) -> float:
    """Modelled cost per query token of block size b (the b-independent work left out).
    ``kernel``: (D, degree) when the all-slots term comes from a score kernel."""
    nk = len(widths)
    sched = _schedule(terms, b, nk, kernel is not None)
    r = rank
    per_block = GAMMA * r * (3 * sum(widths) + 2 * E1) + CALL * (4 + 3 * len(terms))
    per_block += GAMMA * r * (1 + nk) * F0  # short feature-map rows
    for t, mode in zip(terms, sched.hadamard):
        h = len(t.T)
        if not t.shared and not t.direct:
            per_block += 3 * GAMMA * r * t.K  # Q_T
        if not mode and not t.shared:
            per_block += GAMMA * b ** h * r * t.K  # X_{T-last} (x) Q
        m, nn = (t.K, b ** (h + 1)) if mode else (b, t.K * b ** h)
        if t.shared and kernel is not None:
            D, g = kernel
            per_block += 2.0 * b ** (h + 1) * D * (1 + B0 / b) + GAMMA * b ** (h + 1) * (g + 1)
        else:
            per_block += 2.0 * b ** (h + 1) * r * t.K * (1 + B0 / min(m, nn))
        per_block += 2.0 * GAMMA * b ** (h + 1) * t.K  # mask + value contraction
    per_block += sum(GAMMA * b ** (len(S) + 1) * r for S in sched.products)
    return per_block / b


def choose_block(n: int, rank: int, widths: list[int], E1: int, terms: list[_Term],
                 kernel: tuple[int, int] | None = None) -> int:
    cands = [b for b in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)]
    best = min(cands, key=lambda b: block_cost(b, rank, widths, E1, terms, kernel))
    return max(1, min(best, n))  # one short block: no point padding n up to b


# --------------------------------------------------------------------------- main entry

#: elements alive per batch of blocks (within the memory budget): a batch's features then stay in
#: the last-level cache between the feature map and the GEMMs; 4M elements ran 1.1-1.6x faster
#: than a 16M batch on the dev box (pairwise, n = 4,096-65,536)
BATCH_ELEMS = 1 << 22



def causal_factorized(eng, initial: list[torch.Tensor] | None = None, key_offset: int = 0,
                      block: int | None = None, batch_elems: int | None = None) -> torch.Tensor:
    """Causal out (Z, n, E) of a ``FactorizedAttention`` engine; see the module docstring.

    Layout: features are computed per block on (Z * blocks, b, D) views, so each block's feature
    matrix is a contiguous tokens-last (r, b) buffer; states are (r, w) like ``key_state``; the
    results stay (E+1, b) per block until the division.
    """
    ops, xs = eng.ops, eng.xs
    xq = xs[0]
    Z, n, Dq = xq.shape
    if n == 0:
        return xq.new_zeros(Z, 0, math.prod(ops.out_value_shape))
    o = ops.q_offset - key_offset
    nk = len(eng.values)
    r = eng.rank
    terms, letters, out_letters, sizes, free = _terms(eng)
    E = math.prod(ops.out_value_shape)
    widths = [v.shape[-1] + 1 for v in eng.values]
    kernel = eng.score_kernel
    kinfo = (Dq, getattr(kernel, "degree", 8)) if kernel is not None else None
    b = block or choose_block(n, r, widths, E + 1, terms, kinfo)
    sched = _schedule(terms, b, nk, kernel is not None)
    w = eng.weights()
    identity = nk == 1 and letters[0] == out_letters  # pairwise with the plain value einsum

    # keys before the first query position are visible to every query: (Z, r, w_s) states
    P = []
    for s in range(nk):
        upto = max(0, min(o, xs[1 + s].shape[1]))
        st = eng.key_state(s, 0, upto)
        if initial is not None:
            st = st + initial[s]
        P.append(st)

    # blocks per batch from the memory budget: elements alive per block at the peak (features,
    # their contiguous copies for the Hadamard factors, block states + scan buffer + combine
    # temporaries, Hadamard factors, attention tensors of the terms)
    hadamard_inputs = {S[-1] for S in sched.products}
    per_block = b * r * (1 + nk + (0 if identity else 1) + len(hadamard_inputs))
    per_block += 3 * r * sum(widths) + 3 * r * (E + 1) + 3 * b * (E + 1)
    per_block += sum(b ** (len(S) + 1) * r for S in sched.products)
    for t, mode in zip(terms, sched.hadamard):
        h = len(t.T)
        per_block += (0 if mode or t.shared else b ** h * r * t.K) + 3 * b ** (h + 1) * t.K
        per_block += b ** h * Dq if t.shared and kernel is not None else 0
    nbat = max(1, (batch_elems or min(eng.budget_elems, BATCH_ELEMS)) // (Z * per_block))

    cache: dict = {}
    outs = []
    nblocks = -(-n // b)
    for blk0 in range(0, nblocks, nbat):
        nb = min(nbat, nblocks - blk0)
        p0, Lp = blk0 * b, nb * b
        L = min(n, p0 + Lp) - p0
        B = Z * nb
        xqc = xq[:, p0:p0 + L]
        if L < Lp:
            xqc = F.pad(xqc, (0, 0, 0, Lp - L))
        xqb = xqc.reshape(B, b, Dq)
        UqT = eng.chunk_features(eng.query_features, xqb, "queries").transpose(1, 2)  # (B, r, b)
        Uk, Av, prev, xkb = [], [], [], []
        for s in range(nk):
            x, v = xs[1 + s], eng.values[s]
            m = x.shape[1]
            j0, j1 = p0 + o, p0 + o + Lp  # key indices at positions p0 .. p0+Lp
            lo, hi = max(0, j0), min(m, j1)
            if hi <= lo:  # no key of this slot falls in these positions
                lo = hi = 0
            xk, a = x[:, lo:hi], augment(v[:, lo:hi])
            weight = eng.key_weight(s)
            if weight is not None:  # a masked key: [v | 1] weighted 0 removes it from every term
                a = a * weight[:, lo:hi, None]
            front = (lo - j0) if hi > lo else Lp
            back = Lp - front - (hi - lo)
            if front or back:  # padded keys get [v | 1] = 0: they add nothing to any term
                xk = F.pad(xk, (0, 0, front, back))
                a = F.pad(a, (0, 0, front, back))
            xkb.append(xk.reshape(B, b, x.shape[-1]))
            U = eng.chunk_features(eng.key_features, xkb[-1], f"keys {s}")  # (B, b, r)
            a = a.reshape(B, b, widths[s])
            # block states: [v|1]^T U (w x r) is the fast GEMM orientation (as in ``_state``); the
            # prefix scan copies it to (r, w) (1/b the size of U) so the combine reads contiguously
            st = (a.transpose(1, 2) @ U).transpose(1, 2).reshape(Z, nb, r, widths[s])
            pv, P[s] = _exclusive_prefix(st, P[s])
            Uk.append(U)
            Av.append(a)
            prev.append(pv.reshape(B, r, widths[s]))
        # T = {}: every earlier block's state, (E+1, r) @ (r, b) per block
        resT = eng.combine(prev).transpose(1, 2) @ UqT  # (B, E+1, b)
        # U_q may be overwritten by its weighted version only if no autograd graph holds it
        inplace_ok = not (torch.is_grad_enabled() and (resT.requires_grad or UqT.requires_grad))
        if identity:  # pairwise: A^T[j, i] = sum_r w_r Uk[j, r] Uq[i, r] (= P(s_ij)), j <= i
            At = kernel(xqb, xkb) if kernel is not None else Uk[0] @ _weighted(UqT, w, inplace_ok, xq, xqc)
            At = torch.triu(At) if torch.is_grad_enabled() and At.requires_grad else At.triu_()
            resT = torch.baddbmm(resT, Av[0].transpose(1, 2), At)
        else:
            # Hadamard factors X_S (B, j_S[-1], .., j_S[0], i, r): r innermost and contiguous
            # (a tokens-last layout would make broadcast loops b long); the (b, r) copies are
            # 1/b of the products. Only a kernel-only spec (order 2) needs none of them.
            X: dict = {}
            if kernel is None or nk > 1:
                X[()] = _weighted(UqT, w, inplace_ok, xq, xqc).transpose(1, 2).contiguous()
            Uc = {}
            for S in sorted(sched.products, key=len):
                prevX = X[S[:-1]]
                if S[-1] not in Uc:
                    Uc[S[-1]] = Uk[S[-1]].contiguous()
                X[S] = prevX.unsqueeze(1) * Uc[S[-1]].reshape(B, b, *([1] * (prevX.dim() - 2)), r)
            for t, mode in zip(terms, sched.hadamard):
                # the all-slots term straight from the scores when there is a kernel
                A = kernel(xqb, [xkb[s_] for s_ in t.T]) if t.shared and kernel is not None else None
                resT = resT + _intra(t, mode, X, Uk, Av, prev, cache, letters, out_letters, sizes, free, b, A)
        if eng.visible is None:
            out = resT[:, :E] / resT[:, E:]  # (B, E, b)
            outs.append(out.reshape(Z, nb, E, b).transpose(2, 3).reshape(Z, Lp, E)[:, :L])
        else:  # rows that see no unmasked key get 0 (``normalize``)
            res = resT.reshape(Z, nb, E + 1, b).transpose(2, 3).reshape(Z, Lp, E + 1)[:, :L]
            outs.append(eng.normalize(res, p0, p0 + L))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _weighted(UqT: torch.Tensor, w: torch.Tensor | None, inplace_ok: bool, *inputs: torch.Tensor) -> torch.Tensor:
    """U_q^T scaled by the query weights; in place when no autograd graph saved U_q and the
    features are not a view of the inputs (U_q unweighted is not used after this)."""
    if w is None:
        return UqT
    if not inplace_ok or _shares_storage(UqT, *inputs):
        return UqT * w[:, None]
    return UqT.mul_(w[:, None])


def _shares_storage(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a feature callable returned (a view of) one of its inputs: then no in-place ops."""
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == x.untyped_storage().data_ptr() for x in others)


def _exclusive_prefix(st: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P + sum of blocks before t for every t, P + sum of all): st (Z, nb, r, w), P (Z, r, w).

    torch.cumsum over a middle dim is slow once the blocks leave cache, so without autograd this
    is a two-level in-place scan (about 2 sqrt(nb) adds over the whole buffer); ``st`` may be a
    strided view (it is copied straight into the scan buffer)."""
    Z, nb = st.shape[:2]
    if torch.is_grad_enabled() and (st.requires_grad or P.requires_grad):
        cs = torch.cumsum(st.contiguous(), dim=1) + P[:, None]
        return torch.cat([P[:, None], cs[:, :-1]], dim=1), cs[:, -1]
    G = max(1, math.isqrt(nb + 1))
    H = -(-(nb + 1) // G)
    x = st.new_empty(Z, H * G, *st.shape[2:])
    x[:, 0] = P
    x[:, 1:nb + 1] = st
    x[:, nb + 1:] = 0
    xv = x.view(Z, H, G, -1)
    for g in range(1, G):
        xv[:, :, g] += xv[:, :, g - 1]
    for h in range(1, H):
        xv[:, h] += xv[:, h - 1, -1:]
    return x[:, :nb], x[:, nb]


def _mask(h: int, b: int, kpos: int | None, like: torch.Tensor, cache: dict) -> torch.Tensor:
    """prod_t [j_t <= i] over (j_1, .., j_h, i) (symmetric in the j's), with a size-1 K dim
    inserted at ``kpos`` (None: no K dim), in the dtype of ``like``."""
    key = (h, b, kpos, like.dtype, like.device)
    if key not in cache:
        idx = torch.arange(b, device=like.device)
        ok = idx[:, None] <= idx[None, :]  # (j, i)
        mk = torch.ones((b,) * (h + 1), dtype=torch.bool, device=like.device)
        for t in range(h):
            shape = [1] * (h + 1)
            shape[t], shape[-1] = b, b
            mk = mk & ok.reshape(shape)
        mk = mk.to(like.dtype)
        cache[key] = mk if kpos is None else mk.unsqueeze(kpos)
    return cache[key]


def _intra(t: _Term, mode: bool, X: dict, Uk, Av, prev, cache, letters, out_letters, sizes, free, b,
           A: torch.Tensor | None = None):
    """Uq[i] . M(P_{not T}, D_T(i)) for every query of every block, as (B, E+1, b).
    ``A``: the all-slots attention tensor when a score kernel gave it."""
    T, h = t.T, len(t.T)
    B, r = prev[0].shape[:2]
    if t.direct:  # Q_T = [P_num | P_den] of the one other slot
        Q = prev[t.others[0]]
    elif not t.shared:  # Q_T: the other slots' previous states, entrywise in r: (B, r, K)
        rl, bl = free[0], free[1]
        Pnum = [prev[s][..., :-1].reshape(B, r, *[sizes[c] for c in letters[s]]) for s in t.others]
        expr = ",".join(bl + rl + letters[s] for s in t.others) + "->" + bl + rl + t.keep
        qnum = contract(expr, *Pnum).reshape(B, r, t.knum)
        qden = prev[t.others[0]][..., -1]
        for s in t.others[1:]:
            qden = qden * prev[s][..., -1]
        Q = torch.cat([qnum, qden[..., None]], dim=-1)
    # A in the layout (B, [K], j_T[-1], .., j_T[0], i) (mode i) or (B, j_T[-1], [K], ..) (ii)
    if A is not None:
        kpos = None
    elif mode:  # (K, r) @ (r, b^{h+1})
        A = (Q.transpose(1, 2) @ X[T].reshape(B, -1, r).transpose(1, 2)).reshape(B, t.K, *([b] * (h + 1)))
        kpos = 0
    else:  # (b, r) @ (r, [K] b^h)
        Xr = X[T[:-1]]
        if not t.shared:
            Xr = Xr.unsqueeze(1) * Q.transpose(1, 2).reshape(B, t.K, *([1] * (Xr.dim() - 2)), r)
        A = (Uk[T[-1]] @ Xr.reshape(B, -1, r).transpose(1, 2))
        A = A.reshape(B, b, *([] if t.shared else [t.K]), *([b] * h))
        kpos = None if t.shared else 1
    A = A * _mask(h, b, kpos, A, cache)
    if kpos == 1:
        A = A.movedim(2, 1)  # (B, K, j_T[-1], .., i)
    # value einsum on the intra-block values of T
    bl, il = free[1], free[2]
    jl = "".join(free[3:3 + h])  # jl[q] is the token letter of slot T[q]
    jorder = jl[::-1]
    num_ops = [Av[s][..., :-1].reshape(B, b, *[sizes[c] for c in letters[s]]) for s in T]
    num_in = [bl + jl[q] + letters[s] for q, s in enumerate(T)]
    den_ops = [Av[s][..., -1] for s in T]
    den_in = [bl + jl[q] for q in range(h)]
    if t.shared:
        Anum = Aden = A
        anum = bl + jorder + il
    else:
        Anum = A[:, :t.knum].reshape(B, *[sizes[c] for c in t.keep], *([b] * (h + 1)))
        Aden = A[:, t.knum]
        anum = bl + t.keep + jorder + il
    num = contract(",".join([anum] + num_in) + "->" + bl + out_letters + il, Anum, *num_ops)
    den = contract(",".join([bl + jorder + il] + den_in) + "->" + bl + il, Aden, *den_ops)
    return torch.cat([num.reshape(B, -1, b), den[:, None]], dim=1)
