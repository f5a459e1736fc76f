"""Exact attention polynomials at the cost their structure allows (docs/poly-attention.md).

An attention polynomial whose terms each name at most two slots is a sum of inner products: the
terms on a pair of slots (a, b) add up to <X_a[p_a], X_b[p_b]> for the expanded, concatenated
operands (``pairwise_form``; scale and coefficients sit on the lower slot), and a term on one slot
is a per-token bias. Two structures then have fast exact algorithms:

* **trees**, by message passing toward the query slot. For slot c with parent u, the message is
  one streaming softmax pass of u's tokens over c's tokens, with the lse messages of c's children
  as a per-key bias and the entrywise product of v_c and their value messages as per-key values
  (``edge_attention``, which returns (value message, lse) and differentiates through both); at the
  query, out_i is the entrywise product of its children's value messages. O(N_u N_c (D + e)) per
  edge, O(N (D + e)) memory beyond the tiles, forward and backward.
* the **triangle** (Strassen attention), as matrix products blocked over queries, with every
  factor shifted by a maximum so none exceeds 1 (``triangle_attention``); rows whose normalizer
  underflows are recomputed in float64, then by an exact streaming kernel.

Causal masks follow ``Structure.causal_pairs``: child <= parent on every tree edge, and every key
<= the query for the triangle. Both need values that combine entrywise (the default value einsum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import Operands, expand_operand, full_precision_backward, max_abs, term_operands

# ---- the pairwise form of an attention polynomial ---------------------------------------------

@dataclass
class PairwiseForm:
    """``edges[(a, b)] = (X_a, X_b)``, a < b, with <X_a[p], X_b[p']> the sum of the (scaled) terms on
    slots a and b; ``bias[s]`` the per-token sum of the (scaled) one-slot terms of slot s, or None."""

    edges: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    bias: list[torch.Tensor | None]


def pairwise_form(ops: Operands) -> PairwiseForm:
    spec = ops.spec
    arrays = [ops.q, *ops.keys]
    parts: dict[tuple[int, int], tuple[list, list]] = {}
    bias: list[torch.Tensor | None] = [None] * spec.order
    for term in spec.terms:
        xs = [expand_operand(x, f, term.contracted, ops.sizes)
              for x, f in zip(term_operands(spec, ops.sizes, arrays, term), term.einsum.features)]
        c = ops.scale * term.coefficient
        if term.order == 1:
            # summed and scaled in float64: a scale past the dtype's range times a zero sum is 0, not NaN
            b = (xs[0].sum(-1, dtype=torch.float64) * c).to(xs[0].dtype)
            s = term.slots[0]
            bias[s] = b if bias[s] is None else bias[s] + b
            continue
        (a, xa), (b_, xb) = sorted(zip(term.slots, xs), key=lambda p: p[0])
        left, right = parts.setdefault((a, b_), ([], []))
        xa, xb = _scaled_pair(xa, xb, c)
        left.append(xa)
        right.append(xb)
    edges = {key: (torch.cat(l, -1), torch.cat(r, -1)) for key, (l, r) in parts.items()}
    return PairwiseForm(edges, bias)


def _scaled_pair(xa: torch.Tensor, xb: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c x_a, x_b): the factors of c <x_a, x_b>. Where c x_a could overflow the dtype (a huge scale
    on small entries, the scores themselves being small), a power of two p moves to the other side:
    (c/p x_a, p x_b), exact in x_b, so a zero entry of x_b meets a finite one instead of inf (NaN)."""
    if abs(c) <= 1.0 or xa.numel() == 0:
        return c * xa, xb
    room = torch.finfo(xa.dtype).max * 2.0 ** -32
    top = max_abs([xa])[0]
    if abs(c) * top <= room:
        return c * xa, xb
    p = 2.0 ** math.ceil(math.log2(abs(c) * top / room))
    return (c / p) * xa, xb * p


def _offsets(ops: Operands) -> list[int]:
    """Global position of each slot's first token."""
    return [ops.q_offset] + [ops.k_offsets[s] if ops.k_offsets else 0 for s in range(ops.order - 1)]


# ---- one softmax message: streaming pairwise attention with a per-key bias ----------------------

def _blocks(nq: int, nk: int, Z: int, elem: int, budget: int, block_q: int | None, block_k: int | None):
    """Tile sizes: ~4 tiles of Z x bq x bk elements live at once (scores, probabilities, dP, dS)."""
    tile = max(1, budget // (4 * elem))
    bk = block_k or min(nk, 512)
    bq = block_q or min(nq, max(1, tile // max(1, Z * bk)), 2048)
    return max(1, min(bq, nq)), max(1, min(bk, nk))


def _visible_range(q0: int, q1: int, nk: int, causal: bool, off: int) -> int:
    """Keys [0, kend) may be visible to some query in [q0, q1)."""
    if not causal:
        return nk
    return max(0, min(nk, q1 - 1 + off + 1))


def _tile_scores(xq, xk, bias, scale, q0, k0, causal, off, out=None):
    """Scores of one tile (Z, bq, bk) with the bias added and the causal mask applied; written into
    ``out`` (a reused buffer of that shape) when given."""
    if bias is None:
        s = torch.bmm(xq, xk.transpose(1, 2), out=out).mul_(scale)
    else:
        s = torch.baddbmm(bias[:, None, :], xq, xk.transpose(1, 2), alpha=scale, out=out)
    if causal:
        bq, bk = s.shape[1], s.shape[2]
        if k0 + bk - 1 > q0 + off:  # the tile crosses the diagonal
            qi = torch.arange(q0, q0 + bq, device=s.device)
            kj = torch.arange(k0, k0 + bk, device=s.device)
            s.masked_fill_(kj[None, :] > qi[:, None] + off, float("-inf"))
    return s


def _forward(xq, xk, vk, bias, scale, causal, off, bq, bk):
    Z, nq, _ = xq.shape
    nk, e = xk.shape[1], vk.shape[2]
    out = xq.new_empty(Z, nq, e)
    lse = xq.new_empty(Z, nq)
    ninf = float("-inf")
    # one scores buffer for every tile: a fresh tile per step leaves the allocator's heap
    # fragmented, which showed as a peak RSS several tiles above the working set
    tile = xq.new_empty(Z * min(bq, nq) * min(bk, nk))
    for q0 in range(0, nq, bq):
        q1 = min(nq, q0 + bq)
        qc = xq[:, q0:q1]
        m = qc.new_full((Z, q1 - q0), ninf)
        l = qc.new_zeros(Z, q1 - q0)
        acc = qc.new_zeros(Z, q1 - q0, e)
        for k0 in range(0, _visible_range(q0, q1, nk, causal, off), bk):
            k1 = min(nk, k0 + bk)
            buf = tile[: Z * (q1 - q0) * (k1 - k0)].view(Z, q1 - q0, k1 - k0)
            s = _tile_scores(qc, xk[:, k0:k1], None if bias is None else bias[:, k0:k1], scale, q0, k0, causal, off,
                             out=buf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe[..., None]).exp_()
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = torch.baddbmm(acc * corr[..., None], p, vk[:, k0:k1])
            m = m_new
        ok = l > 0
        out[:, q0:q1] = torch.where(ok[..., None], acc / torch.where(ok, l, torch.ones_like(l))[..., None], 0.0)
        lse[:, q0:q1] = torch.where(ok, torch.log(torch.where(ok, l, torch.ones_like(l))) + m, ninf)
    return out, lse


def _backward(xq, xk, vk, bias, scale, causal, off, bq, bk, out, lse, d_out, d_lse):
    Z, nq, _ = xq.shape
    nk = xk.shape[1]
    # D'_i = <dO_i, out_i> - dlse_i ; rows with lse = -inf have no visible key and get no gradient
    delta = (d_out * out).sum(-1) - d_lse
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    dq = torch.zeros_like(xq)
    dk = torch.zeros_like(xk)
    dv = torch.zeros_like(vk)
    db = torch.zeros_like(xk[..., 0]) if bias is not None else None
    for q0 in range(0, nq, bq):
        q1 = min(nq, q0 + bq)
        qc, dO = xq[:, q0:q1], d_out[:, q0:q1]
        L, Dd = lse_safe[:, q0:q1, None], delta[:, q0:q1, None]
        for k0 in range(0, _visible_range(q0, q1, nk, causal, off), bk):
            k1 = min(nk, k0 + bk)
            kc, vc = xk[:, k0:k1], vk[:, k0:k1]
            s = _tile_scores(qc, kc, None if bias is None else bias[:, k0:k1], scale, q0, k0, causal, off)
            p = s.sub_(L).exp_()
            dv[:, k0:k1] += torch.bmm(p.transpose(1, 2), dO)
            ds = torch.bmm(dO, vc.transpose(1, 2)).sub_(Dd).mul_(p)
            if db is not None:
                db[:, k0:k1] += ds.sum(1)
            dq[:, q0:q1] += scale * torch.bmm(ds, kc)
            dk[:, k0:k1] += scale * torch.bmm(ds.transpose(1, 2), qc)
    return dq, dk, dv, db


def _dense_softmax(s: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, lse) over ``dims`` with plain differentiable ops; a row with every score -inf gets
    weights 0 and lse -inf."""
    lse = torch.logsumexp(s, dim=dims)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - shift.reshape(*shift.shape, *([1] * len(dims)))), lse


def create_graph_grads(forward, inputs: list, d_outs: list) -> list:
    """Gradients of ``forward(*inputs)`` (a tuple of outputs) that autograd can differentiate again
    (``backward(create_graph=True)``, gradient penalties): the forward is recomputed with a full
    graph, so this path holds every weight (memory O(n * key tuples), unlike the streaming backwards).
    One entry per input: None for a None input, zeros where it gets no gradient."""
    with torch.enable_grad():
        outs = forward(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, d_outs) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True) if wanted and pairs else ())
    result = []
    for t in inputs:
        g = next(grads) if t is not None and t.requires_grad and pairs else None
        result.append(None if t is None else (torch.zeros_like(t) if g is None else g))
    return result


def _dense_edge(xq, xk, vk, bias, scale, causal, off):
    s = scale * (xq @ xk.transpose(1, 2))
    if bias is not None:
        s = s + bias[:, None, :]
    if causal:
        qi = torch.arange(xq.shape[1], device=xq.device)
        kj = torch.arange(xk.shape[1], device=xq.device)
        s = s.masked_fill(kj[None, :] > qi[:, None] + off, float("-inf"))
    p, lse = _dense_softmax(s, (-1,))
    return p @ vk, lse


class _BiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xq, xk, vk, bias, scale, causal, off, bq, bk):
        out, lse = _forward(xq, xk, vk, bias, scale, causal, off, bq, bk)
        ctx.save_for_backward(xq, xk, vk, bias, out, lse)
        ctx.cfg = (scale, causal, off, bq, bk)
        return out, lse

    @staticmethod
    @full_precision_backward
    def backward(ctx, d_out, d_lse):
        xq, xk, vk, bias, out, lse = ctx.saved_tensors
        scale, causal, off, bq, bk = ctx.cfg
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            d_lse = None if d_lse is None else torch.where(torch.isfinite(lse), d_lse, torch.zeros_like(d_lse))
            grads = create_graph_grads(lambda a, b, c, d: _dense_edge(a, b, c, d, scale, causal, off),
                                        [xq, xk, vk, bias], [d_out, d_lse])
            return (*grads, None, None, None, None, None)
        if d_out is None:
            d_out = torch.zeros_like(out)
        if d_lse is None:
            d_lse = torch.zeros_like(lse)
        # d_lse at rows with lse = -inf is meaningless; zero it so nothing propagates from there
        d_lse = torch.where(torch.isfinite(lse), d_lse, torch.zeros_like(d_lse))
        dq, dk, dv, db = _backward(xq, xk, vk, bias, scale, causal, off, bq, bk, out, lse, d_out, d_lse)
        return dq, dk, dv, db, None, None, None, None, None


def edge_attention(
    xq: torch.Tensor,
    xk: torch.Tensor,
    vk: torch.Tensor,
    key_bias: torch.Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    memory_budget: int,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pairwise softmax attention with a per-key bias: returns (out, lse).

    Args:
        xq: (*batch, Nq, d) queries.  xk: (*batch, Nk, d) keys.  vk: (*batch, Nk, e) values.
        key_bias: (*batch, Nk) additive per-key bias b_k (may contain -inf: key excluded), or None.
        scale: multiplies <xq_i, xk_k> (may be negative).
        causal: key k visible to query i iff k <= i + causal_offset.
        memory_budget: bytes for the working tiles (about 4 tiles of batch x block_q x block_k).
    Returns:
        out (*batch, Nq, e) = softmax-weighted mean of vk, lse (*batch, Nq) = log of the normalizer.
        A query with no visible key gets out = 0 and lse = -inf (and no gradient).

    Memory O((Nq + Nk)(d + e) + tile), forward and backward (the backward recomputes the tiles).
    Differentiable once in xq, xk, vk and key_bias, for losses depending on out and/or lse.
    """
    batch = xq.shape[:-2]
    nq, d = xq.shape[-2:]
    nk, e = xk.shape[-2], vk.shape[-1]
    Z = math.prod(batch) if batch else 1
    q3, k3, v3 = xq.reshape(Z, nq, d), xk.reshape(Z, nk, d), vk.reshape(Z, nk, e)
    b2 = key_bias.reshape(Z, nk) if key_bias is not None else None
    bq, bk = _blocks(nq, nk, Z, xq.element_size(), memory_budget, block_q, block_k)
    out, lse = _BiasedAttention.apply(q3, k3, v3, b2, float(scale), bool(causal), int(causal_offset), bq, bk)
    return out.reshape(*batch, nq, e), lse.reshape(*batch, nq)


# ---- trees ------------------------------------------------------------------------------------

def tree_exact(ops: Operands, budget_bytes: int) -> torch.Tensor:
    """Exact tree attention by message passing toward the query: (Z, n, e)."""
    spec = ops.spec
    form = pairwise_form(ops)
    parent = spec.structure.parent
    offsets = _offsets(ops)
    Z = ops.q.shape[0]
    values = [None] + [v.reshape(Z, v.shape[1], -1) for v in ops.values]

    key_bias = ops.key_bias or (None,) * (ops.order - 1)

    def message(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(value message (Z, N_parent, e), lse (Z, N_parent)) of slot c's subtree."""
        w, bias = values[c], form.bias[c]
        if key_bias[c - 1] is not None:  # a key mask: 0 keeps a key, -inf drops it
            kb = key_bias[c - 1].to(ops.q.dtype)
            bias = kb if bias is None else bias + kb
        for g in (s for s, p in enumerate(parent) if p == c):
            mv, ml = message(g)
            w = w * mv
            bias = ml if bias is None else bias + ml
        u = parent[c]
        xu, xc = form.edges[(min(u, c), max(u, c))]
        if u > c:
            xu, xc = xc, xu
        return edge_attention(xu, xc, w.to(xu.dtype), bias, 1.0, ops.causal, offsets[u] - offsets[c], budget_bytes)

    out = None
    for c in (s for s, p in enumerate(parent) if p == 0):
        mv, _ = message(c)
        out = mv if out is None else out * mv
    return out.reshape(Z, ops.n, *ops.out_value_shape)


# ---- the triangle (Strassen attention) ----------------------------------------------------------

@dataclass(frozen=True)
class _Cfg:
    causal: bool
    off: int
    budget: int


@dataclass
class _Tri:
    """The six edge vectors of a triangle: a_ij = <qa_i, k1a_j>, b_jk = <k1b_j, k2b_k>,
    c_ik = <qc_i, k2c_k> (scale and coefficients already folded in)."""

    qa: torch.Tensor
    qc: torch.Tensor
    k1a: torch.Tensor
    k1b: torch.Tensor
    k2b: torch.Tensor
    k2c: torch.Tensor

    def rows(self, z: int, rows: torch.Tensor, dtype) -> "_Tri":
        """Batch entry z, the given query rows (all keys), in ``dtype``."""
        f = lambda t: t[z: z + 1].to(dtype)  # noqa: E731
        return _Tri(self.qa[z: z + 1, rows].to(dtype), self.qc[z: z + 1, rows].to(dtype), f(self.k1a),
                    f(self.k1b), f(self.k2b), f(self.k2c))

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.qa.shape[1], self.k1a.shape[1], self.k2b.shape[1]


def _bmm_t(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y^T for (Z, a, d), (Z, b, d)."""
    return torch.bmm(x, y.transpose(1, 2))


def _vis(pos_max: int, n: int, cfg: _Cfg) -> int:
    """Keys [0, result) are visible to a row whose position is pos_max."""
    return n if not cfg.causal else max(0, min(n, pos_max + cfg.off + 1))


def _mask(pos: torch.Tensor, start: int, stop: int, cfg: _Cfg) -> torch.Tensor | None:
    """(R, stop-start) boolean, True where key index > pos + off (invisible); None if not causal."""
    if not cfg.causal:
        return None
    idx = torch.arange(start, stop, device=pos.device)
    return idx[None, :] > pos[:, None] + cfg.off


def _tri_blocks(R: int, n1: int, n2: int, Z: int, E: int, elem: int, cfg: _Cfg) -> tuple[int, int]:
    bj = min(n1, 256)
    per_row = Z * E * (n2 + 3 * bj) * elem  # W (or R), T and the elementwise product of one row
    bi = max(1, min(256, (cfg.budget // 2) // max(1, per_row)))
    return max(1, min(bi, R)), max(1, min(bj, n1))


def _key_shift(t: _Tri, jmax: int, kmax: int, bj: int) -> torch.Tensor:
    """beta_j = max_{k < kmax} b_jk for j < jmax (Z, jmax); -inf when kmax = 0."""
    Z = t.k1b.shape[0]
    beta = t.k1b.new_full((Z, jmax), float("-inf"))
    if kmax == 0:
        return beta
    for c0 in range(0, jmax, bj):
        c1 = min(jmax, c0 + bj)
        beta[:, c0:c1] = _bmm_t(t.k1b[:, c0:c1], t.k2b[:, :kmax]).amax(-1)
    return beta


def _row_shifts(t: _Tri, pos, beta, cfg, bi):
    """alpha_i = max_{j visible} (a_ij + beta_j), gamma_i = max_{k visible} c_ik (Z, R) each."""
    Z, R, _ = t.qa.shape
    alpha = t.qa.new_full((Z, R), float("-inf"))
    gamma = t.qa.new_full((Z, R), float("-inf"))
    _, n1, n2 = t.sizes
    for r0 in range(0, R, bi):
        r1 = min(R, r0 + bi)
        pmax = int(pos[r1 - 1])
        jI, kI = _vis(pmax, n1, cfg), _vis(pmax, n2, cfg)
        if jI > 0:
            a = _bmm_t(t.qa[:, r0:r1], t.k1a[:, :jI]).add_(beta[:, None, :jI])
            mk = _mask(pos[r0:r1], 0, jI, cfg)
            if mk is not None:
                a.masked_fill_(mk, float("-inf"))
            alpha[:, r0:r1] = a.amax(-1)
        if kI > 0:
            c = _bmm_t(t.qc[:, r0:r1], t.k2c[:, :kI])
            mk = _mask(pos[r0:r1], 0, kI, cfg)
            if mk is not None:
                c.masked_fill_(mk, float("-inf"))
            gamma[:, r0:r1] = c.amax(-1)
    return alpha, gamma


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


class _Factors:
    """Recomputes the factor blocks X, Y, Zf for one call (one set of rows, one dtype)."""

    def __init__(self, t: _Tri, pos, cfg, stats):
        self.t, self.pos, self.cfg = t, pos, cfg
        self.alpha, self.gamma, self.beta = stats["alpha"], stats["gamma"], stats["beta"]
        Z = t.qa.shape[0]
        jmax, kmax = self.beta.shape[1], stats["kmax"]
        self.kmax = kmax
        # cache the whole Y = exp(b - beta) when it fits in a quarter of the budget
        self.Y = None
        if Z * jmax * kmax * t.qa.element_size() <= cfg.budget // 4 and jmax * kmax > 0:
            self.Y = self._y(0, jmax, kmax)

    def _y(self, c0, c1, kI):
        return _bmm_t(self.t.k1b[:, c0:c1], self.t.k2b[:, :kI]).sub_(
            _finite_or_zero(self.beta[:, c0:c1])[..., None]).exp_()

    def Y_block(self, c0, c1, kI):
        return self.Y[:, c0:c1, :kI] if self.Y is not None else self._y(c0, c1, kI)

    def X_block(self, r0, r1, c0, c1):
        x = _bmm_t(self.t.qa[:, r0:r1], self.t.k1a[:, c0:c1])
        x.add_(_finite_or_zero(self.beta[:, None, c0:c1])).sub_(_finite_or_zero(self.alpha[:, r0:r1, None])).exp_()
        mk = _mask(self.pos[r0:r1], c0, c1, self.cfg)
        return x.masked_fill_(mk, 0.0) if mk is not None else x

    def Z_block(self, r0, r1, kI):
        z = _bmm_t(self.t.qc[:, r0:r1], self.t.k2c[:, :kI])
        z.sub_(_finite_or_zero(self.gamma[:, r0:r1, None])).exp_()
        mk = _mask(self.pos[r0:r1], 0, kI, self.cfg)
        return z.masked_fill_(mk, 0.0) if mk is not None else z


def _gemm_forward(t: _Tri, pos, v1a, v2a, cfg: _Cfg):
    """Forward for the rows of ``t`` at positions ``pos`` (R,). Returns (num (Z, R, E), stats)."""
    Z, R, _ = t.qa.shape
    _, n1, n2 = t.sizes
    E = v1a.shape[-1]
    bi, bj = _tri_blocks(R, n1, n2, Z, E, t.qa.element_size(), cfg)
    pmax = int(pos.max()) if R else 0
    jmax, kmax = _vis(pmax, n1, cfg), _vis(pmax, n2, cfg)
    beta = _key_shift(t, jmax, kmax, bj)
    alpha, gamma = _row_shifts(t, pos, beta, cfg, bi)
    stats = dict(alpha=alpha, gamma=gamma, beta=beta, kmax=kmax, bi=bi, bj=bj)
    F = _Factors(t, pos, cfg, stats)
    num = t.qa.new_zeros(Z, R, E)
    v1t, v2t = v1a.transpose(1, 2), v2a.transpose(1, 2)  # (Z, E, n)
    for r0, r1, jI, kI, _, W in _row_blocks(t, pos, cfg, F, v2t, bi):
        b = r1 - r0
        acc = num[:, r0:r1]
        for c0 in range(0, jI, bj):
            c1 = min(jI, c0 + bj)
            T = torch.bmm(W, F.Y_block(c0, c1, kI).transpose(1, 2)).view(Z, b, E, c1 - c0)
            X = F.X_block(r0, r1, c0, c1)  # (Z, b, cj)
            T.mul_(v1t[:, None, :, c0:c1])
            acc += torch.matmul(T, X[..., None])[..., 0]  # acc is a view of num
    return num, stats


def _row_blocks(t: _Tri, pos, cfg: _Cfg, F, v2t, bi: int):
    """Blocks of bi rows that see some (j, k): (r0, r1, jI, kI, Zf, W), jI / kI the visible keys of
    the block's last row, Zf the Z-factors (Z, b, kI) and W = Zf times the augmented v2, laid out
    (Z, b * E, kI)."""
    Z, R, _ = t.qa.shape
    _, n1, n2 = t.sizes
    E = v2t.shape[1]
    for r0 in range(0, R, bi):
        r1 = min(R, r0 + bi)
        p_last = int(pos[r1 - 1])
        jI, kI = _vis(p_last, n1, cfg), _vis(p_last, n2, cfg)
        if jI == 0 or kI == 0:
            continue
        Zf = F.Z_block(r0, r1, kI)  # (Z, b, kI)
        yield r0, r1, jI, kI, Zf, (Zf[:, :, None, :] * v2t[:, None, :, :kI]).reshape(Z, (r1 - r0) * E, kI)


def _gemm_backward(t: _Tri, pos, v1a, v2a, cfg: _Cfg, stats, inv_den, dOa):
    """Gradients of the rows' contribution. inv_den (Z, R): 1/den_i (0 for rows handled elsewhere);
    dOa (Z, R, E) = [dO | -D']. Returns the six edge-vector gradients, dv1 (Z, n1, e), dv2 (Z, n2, e)."""
    Z, R, _ = t.qa.shape
    _, n1, n2 = t.sizes
    E = v1a.shape[-1]
    e = E - 1
    bi, bj = stats["bi"], stats["bj"]
    F = _Factors(t, pos, cfg, stats)
    jmax, kmax = stats["beta"].shape[1], stats["kmax"]
    g = _Tri(*(torch.zeros_like(x) for x in (t.qa, t.qc, t.k1a, t.k1b, t.k2b, t.k2c)))
    dv1 = t.k1a.new_zeros(Z, n1, e)
    dv2 = t.k2b.new_zeros(Z, n2, e)
    if jmax == 0 or kmax == 0:
        return g, dv1, dv2
    v1t, v2t = v1a.transpose(1, 2), v2a.transpose(1, 2)
    dO = dOa[..., :e]

    def Xp(r0, r1, c0, c1):  # X' = X / den
        return F.X_block(r0, r1, c0, c1).mul_(inv_den[:, r0:r1, None])

    # pass 1: rows outside, j blocks inside -> G^a (qa, k1a, dv1) and G^c (qc, k2c, dv2)
    for r0, r1, jI, kI, Zf, W in _row_blocks(t, pos, cfg, F, v2t, bi):
        b = r1 - r0
        dOI, dOaI = dO[:, r0:r1], dOa[:, r0:r1]
        Racc = t.qa.new_zeros(Z, b * E, kI)
        for c0 in range(0, jI, bj):
            c1 = min(jI, c0 + bj)
            YJ = F.Y_block(c0, c1, kI)
            X = Xp(r0, r1, c0, c1)  # (Z, b, cj)
            T = torch.bmm(W, YJ.transpose(1, 2)).view(Z, b, E, c1 - c0)
            # G^a_ij = X'_ij sum_E dOa_iE v1a_jE T_E[i,j]
            Ga = (T * v1t[:, None, :, c0:c1]).mul_(dOaI[..., None]).sum(2).mul_(X)
            # dv1_je = sum_i X'_ij dO_ie T_e[i,j]
            dv1[:, c0:c1] += torch.einsum("zbej,zbe->zje", T[:, :, :e] * X[:, :, None, :], dOI)
            g.qa[:, r0:r1] += torch.bmm(Ga, t.k1a[:, c0:c1])
            g.k1a[:, c0:c1] += torch.bmm(Ga.transpose(1, 2), t.qa[:, r0:r1])
            # R_E[i,k] += sum_j X'_ij v1a_jE Y_jk
            XV = (X[:, :, None, :] * v1t[:, None, :, c0:c1]).reshape(Z, b * E, c1 - c0)
            Racc.baddbmm_(XV, YJ)
        Rv = Racc.view(Z, b, E, kI)
        # G^c_ik = Zf_ik sum_E dOa_iE v2a_kE R_E[i,k] ; dv2_ke = sum_i Zf_ik dO_ie R_e[i,k]
        Gc = (Rv * v2t[:, None, :, :kI]).mul_(dOaI[..., None]).sum(2).mul_(Zf)
        dv2[:, :kI] += torch.einsum("zbek,zbe->zke", Rv[:, :, :e] * Zf[:, :, None, :], dOI)
        g.qc[:, r0:r1] += torch.bmm(Gc, t.k2c[:, :kI])
        g.k2c[:, :kI] += torch.bmm(Gc.transpose(1, 2), t.qc[:, r0:r1])

    # pass 2: j blocks outside, rows inside -> G^b (k1b, k2b)
    for c0 in range(0, jmax, bj):
        c1 = min(jmax, c0 + bj)
        cj = c1 - c0
        Q = t.qa.new_zeros(Z, cj * E, kmax)
        for r0 in range(0, R, bi):
            r1 = min(R, r0 + bi)
            if cfg.causal and c0 > int(pos[r1 - 1]) + cfg.off:
                continue  # every j of this block is in the future of these rows
            X = Xp(r0, r1, c0, c1)  # (Z, b, cj)
            Zf = F.Z_block(r0, r1, kmax)  # (Z, b, kmax)
            M = (X.transpose(1, 2)[:, :, None, :] * dOa[:, r0:r1].transpose(1, 2)[:, None, :, :])
            Q.baddbmm_(M.reshape(Z, cj * E, r1 - r0), Zf)
        Qv = Q.view(Z, cj, E, kmax)
        Gb = (Qv * v2t[:, None, :, :kmax]).mul_(v1a[:, c0:c1, :, None]).sum(2)
        Gb.mul_(F.Y_block(c0, c1, kmax))
        g.k1b[:, c0:c1] += torch.bmm(Gb, t.k2b[:, :kmax])
        g.k2b[:, :kmax] += torch.bmm(Gb.transpose(1, 2), t.k1b[:, c0:c1])
    return g, dv1, dv2


# ---- exact streaming kernel (fallback for rows whose normalizer underflows) ----------------------

def _direct_tiles(t: _Tri, pos, cfg: _Cfg):
    """Tiles (r0, r1, c0, c1, kI) for the exact kernel: ~budget/4 bytes per tile of h."""
    Z, R, _ = t.qa.shape
    _, n1, n2 = t.sizes
    per = max(1, (cfg.budget // 4) // t.qa.element_size() // max(1, Z))
    bk = max(1, n2)
    bj = max(1, min(n1, per // bk))
    bi = max(1, min(R, per // (bj * bk)))
    for r0 in range(0, R, bi):
        r1 = min(R, r0 + bi)
        p_last = int(pos[r1 - 1])
        jI, kI = _vis(p_last, n1, cfg), _vis(p_last, n2, cfg)
        for c0 in range(0, jI, bj):
            yield r0, r1, c0, min(jI, c0 + bj), kI


def _direct_scores(t: _Tri, pos, cfg, r0, r1, c0, c1, kI):
    a = _bmm_t(t.qa[:, r0:r1], t.k1a[:, c0:c1])  # (Z, b, cj)
    bm = _bmm_t(t.k1b[:, c0:c1], t.k2b[:, :kI])  # (Z, cj, kI)
    c = _bmm_t(t.qc[:, r0:r1], t.k2c[:, :kI])  # (Z, b, kI)
    if cfg.causal:
        a.masked_fill_(_mask(pos[r0:r1], c0, c1, cfg), float("-inf"))
        c.masked_fill_(_mask(pos[r0:r1], 0, kI, cfg), float("-inf"))
    return a[:, :, :, None] + bm[:, None, :, :] + c[:, :, None, :]  # (Z, b, cj, kI)


def _direct_forward(t: _Tri, pos, v1a, v2a, cfg: _Cfg):
    """Exact online-softmax forward over (rows x j-block x k) tiles: (out (Z,R,e), lse (Z,R))."""
    Z, R, _ = t.qa.shape
    E = v1a.shape[-1]
    m = t.qa.new_full((Z, R), float("-inf"))
    acc = t.qa.new_zeros(Z, R, E)
    for r0, r1, c0, c1, kI in _direct_tiles(t, pos, cfg):
        if kI == 0:
            continue
        h = _direct_scores(t, pos, cfg, r0, r1, c0, c1, kI)
        b, cj = r1 - r0, c1 - c0
        m_old = m[:, r0:r1]
        m_new = torch.maximum(m_old, h.amax(dim=(2, 3)))
        m_safe = _finite_or_zero(m_new)
        p = h.sub_(m_safe[:, :, None, None]).exp_()
        pv2 = torch.bmm(p.reshape(Z, b * cj, kI), v2a[:, :kI]).view(Z, b, cj, E)
        contrib = (pv2 * v1a[:, None, c0:c1, :]).sum(2)
        acc[:, r0:r1] = acc[:, r0:r1] * torch.exp(m_old - m_safe)[..., None] + contrib
        m[:, r0:r1] = m_new
    den = acc[..., -1]
    ok = den > 0
    one = torch.ones_like(den)
    out = torch.where(ok[..., None], acc[..., :-1] / torch.where(ok, den, one)[..., None], 0.0)
    lse = torch.where(ok, torch.log(torch.where(ok, den, one)) + _finite_or_zero(m), float("-inf"))
    return out, lse


def _direct_backward(t: _Tri, pos, v1a, v2a, cfg: _Cfg, lse, dOa):
    Z, R, _ = t.qa.shape
    _, n1, n2 = t.sizes
    E = v1a.shape[-1]
    e = E - 1
    g = _Tri(*(torch.zeros_like(x) for x in (t.qa, t.qc, t.k1a, t.k1b, t.k2b, t.k2c)))
    dv1, dv2 = t.k1a.new_zeros(Z, n1, e), t.k2b.new_zeros(Z, n2, e)
    L = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    dO = dOa[..., :e]
    for r0, r1, c0, c1, kI in _direct_tiles(t, pos, cfg):
        if kI == 0:
            continue
        b, cj = r1 - r0, c1 - c0
        p = _direct_scores(t, pos, cfg, r0, r1, c0, c1, kI).sub_(L[:, r0:r1, None, None]).exp_()
        w = (dOa[:, r0:r1, None, :] * v1a[:, None, c0:c1, :]).reshape(Z, b * cj, E)
        ds = torch.bmm(w, v2a[:, :kI].transpose(1, 2)).view(Z, b, cj, kI).mul_(p)
        Ga, Gc, Gb = ds.sum(3), ds.sum(2), ds.sum(1)
        pf = p.reshape(Z, b * cj, kI)
        dv1[:, c0:c1] += (torch.bmm(pf, v2a[:, :kI, :e]).view(Z, b, cj, e) * dO[:, r0:r1, None, :]).sum(1)
        Mv = (dO[:, r0:r1, None, :] * v1a[:, None, c0:c1, :e]).reshape(Z, b * cj, e)
        dv2[:, :kI] += torch.bmm(pf.transpose(1, 2), Mv)
        g.qa[:, r0:r1] += torch.bmm(Ga, t.k1a[:, c0:c1])
        g.qc[:, r0:r1] += torch.bmm(Gc, t.k2c[:, :kI])
        g.k1a[:, c0:c1] += torch.bmm(Ga.transpose(1, 2), t.qa[:, r0:r1])
        g.k1b[:, c0:c1] += torch.bmm(Gb, t.k2b[:, :kI])
        g.k2b[:, :kI] += torch.bmm(Gb.transpose(1, 2), t.k1b[:, c0:c1])
        g.k2c[:, :kI] += torch.bmm(Gc.transpose(1, 2), t.qc[:, r0:r1])
    return g, dv1, dv2


# ---- tiers -----------------------------------------------------------------------------------

def _threshold(dtype: torch.dtype, n1: int, n2: int) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * max(1, n1) * max(1, n2) / fi.eps


def _finish(num, stats, n1, n2):
    """out, lse, accepted, empty from a GEMM-forward numerator."""
    den = num[..., -1]
    empty = ~(torch.isfinite(stats["alpha"]) & torch.isfinite(stats["gamma"]))
    good = (den >= _threshold(num.dtype, n1, n2)) & torch.isfinite(num).all(-1)
    safe = torch.where(good, den, torch.ones_like(den))
    out = torch.where(good[..., None], num[..., :-1] / safe[..., None], 0.0)
    lse = torch.where(good, torch.log(safe) + _finite_or_zero(stats["alpha"]) + _finite_or_zero(stats["gamma"]),
                      float("-inf"))
    return out, lse, good, empty


def _forward_all(t: _Tri, v1a, v2a, cfg: _Cfg):
    """Tiered forward. tier (Z, n) int8: 0 GEMM in the input dtype, 1 GEMM in float64, 2 exact
    streaming kernel, -1 empty row (no admissible (j, k))."""
    Z, n, _ = t.qa.shape
    _, n1, n2 = t.sizes
    pos = torch.arange(n, device=t.qa.device)
    num, stats = _gemm_forward(t, pos, v1a, v2a, cfg)
    out, lse, good, empty = _finish(num, stats, n1, n2)
    tier = torch.zeros(Z, n, dtype=torch.int8, device=t.qa.device)
    tier[empty] = -1
    bad = ~good & ~empty
    if bad.any():
        for z in range(Z):
            rows = bad[z].nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            v1z, v2z = v1a[z: z + 1], v2a[z: z + 1]
            if t.qa.dtype != torch.float64:
                sub = t.rows(z, rows, torch.float64)
                num64, st64 = _gemm_forward(sub, rows, v1z.double(), v2z.double(), cfg)
                o64, l64, g64, _ = _finish(num64, st64, n1, n2)
                out[z, rows[g64[0]]] = o64[0, g64[0]].to(t.qa.dtype)
                lse[z, rows[g64[0]]] = l64[0, g64[0]].to(t.qa.dtype)
                tier[z, rows[g64[0]]] = 1
                rows = rows[~g64[0]]
                if rows.numel() == 0:
                    continue
            od, ld = _direct_forward(t.rows(z, rows, t.qa.dtype), rows, v1z, v2z, cfg)
            out[z, rows], lse[z, rows] = od[0], ld[0]
            tier[z, rows] = 2
    return out, lse, stats, num[..., -1], tier


def _augment(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _dense_triangle(qa, qc, k1a, k1b, k2b, k2c, v1, v2, cfg):
    """out, lse of the triangle with every score (Z, n, m1, m2) held (the double-backward path)."""
    s = ((qa @ k1a.transpose(1, 2))[:, :, :, None] + (k1b @ k2b.transpose(1, 2))[:, None]
         + (qc @ k2c.transpose(1, 2))[:, :, None, :])
    if cfg.causal:
        qi = torch.arange(qa.shape[1], device=qa.device)[:, None, None]
        j = torch.arange(k1a.shape[1], device=qa.device)[None, :, None]
        k = torch.arange(k2c.shape[1], device=qa.device)[None, None, :]
        s = s.masked_fill((j > qi + cfg.off) | (k > qi + cfg.off), float("-inf"))
    p, lse = _dense_softmax(s, (-2, -1))
    return torch.einsum("zijk,zje,zke->zie", p, v1, v2), lse


class _Triangle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qa, qc, k1a, k1b, k2b, k2c, v1, v2, cfg):
        t = _Tri(qa, qc, k1a, k1b, k2b, k2c)
        v1a, v2a = _augment(v1), _augment(v2)
        out, lse, stats, den, tier = _forward_all(t, v1a, v2a, cfg)
        ctx.cfg = cfg
        ctx.stats_meta = (stats["kmax"], stats["bi"], stats["bj"])
        ctx.save_for_backward(qa, qc, k1a, k1b, k2b, k2c, v1, v2, out, lse, stats["alpha"], stats["gamma"],
                              stats["beta"], den, tier)
        return out, lse

    @staticmethod
    @full_precision_backward
    def backward(ctx, d_out, d_lse):
        qa, qc, k1a, k1b, k2b, k2c, v1, v2, out, lse, alpha, gamma, beta, den, tier = ctx.saved_tensors
        cfg = ctx.cfg
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            d_lse = None if d_lse is None else torch.where(torch.isfinite(lse), d_lse, torch.zeros_like(d_lse))
            grads = create_graph_grads(lambda *xs: _dense_triangle(*xs, cfg), [qa, qc, k1a, k1b, k2b, k2c, v1, v2],
                                        [d_out, d_lse])
            return (*grads, None)
        t = _Tri(qa, qc, k1a, k1b, k2b, k2c)
        kmax, bi, bj = ctx.stats_meta
        Z, n, _ = qa.shape
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        live = tier >= 0
        d_out = torch.where(live[..., None], d_out, 0.0)
        d_lse = torch.where(live, d_lse, 0.0)
        delta = (d_out * out).sum(-1) - d_lse
        dOa = torch.cat([d_out, -delta[..., None]], dim=-1)
        v1a, v2a = _augment(v1), _augment(v2)
        pos = torch.arange(n, device=qa.device)
        stats = dict(alpha=alpha, gamma=gamma, beta=beta, kmax=kmax, bi=bi, bj=bj)
        t0 = tier == 0
        inv_den = torch.where(t0, 1.0 / torch.where(t0, den, torch.ones_like(den)), 0.0)
        g, dv1, dv2 = _gemm_backward(t, pos, v1a, v2a, cfg, stats, inv_den, dOa)
        for z in range(Z):
            for tr in (1, 2):
                rows = (tier[z] == tr).nonzero()[:, 0]
                if rows.numel() == 0:
                    continue
                dtype = torch.float64 if tr == 1 else qa.dtype
                sub = t.rows(z, rows, dtype)
                v1z, v2z = v1a[z: z + 1].to(dtype), v2a[z: z + 1].to(dtype)
                dOa_r = dOa[z: z + 1, rows].to(dtype)
                if tr == 1:
                    num64, st64 = _gemm_forward(sub, rows, v1z, v2z, cfg)
                    part, p1, p2 = _gemm_backward(sub, rows, v1z, v2z, cfg, st64, 1.0 / num64[..., -1], dOa_r)
                else:
                    part, p1, p2 = _direct_backward(sub, rows, v1z, v2z, cfg, lse[z: z + 1, rows].to(dtype), dOa_r)
                g.qa[z, rows] += part.qa[0].to(qa.dtype)
                g.qc[z, rows] += part.qc[0].to(qa.dtype)
                for acc, piece in ((g.k1a, part.k1a), (g.k1b, part.k1b), (g.k2b, part.k2b), (g.k2c, part.k2c),
                                   (dv1, p1), (dv2, p2)):
                    acc[z] += piece[0].to(qa.dtype)
        return g.qa, g.qc, g.k1a, g.k1b, g.k2b, g.k2c, dv1, dv2, None


def triangle_attention(qa, qc, k1a, k1b, k2b, k2c, v1, v2, *, causal: bool, causal_offset: int,
                       memory_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact triangle attention, h_ijk = <qa_i,k1a_j> + <k1b_j,k2b_k> + <qc_i,k2c_k> (scales folded),
    out_i = sum_jk softmax_jk(h) v1_j ⊙ v2_k; returns (out (Z, n, e), lse (Z, n)).

    Causal: j <= i + causal_offset and k <= i + causal_offset. Every input is (Z, N, .); gradients
    flow through both outputs (a memory-bounded custom backward)."""
    cfg = _Cfg(bool(causal), int(causal_offset), int(memory_budget))
    return _Triangle.apply(qa, qc, k1a, k1b, k2b, k2c, v1, v2, cfg)


def triangle_exact(ops: Operands, budget_bytes: int) -> torch.Tensor:
    """Exact attention for a cycle of 2-slot terms over 3 slots (Strassen): (Z, n, e).

    One-slot terms of the key slots fold into the (1, 2) edge as extra coordinates
    [X_1 | bias_1 | 1] . [X_2 | 1 | bias_2]; a one-slot term of the query shifts every score of a
    row equally and cancels in its softmax."""
    form = pairwise_form(ops)
    qa, k1a = form.edges[(0, 1)]
    k1b, k2b = form.edges[(1, 2)]
    qc, k2c = form.edges[(0, 2)]
    b1, b2 = form.bias[1], form.bias[2]
    if b1 is not None or b2 is not None:
        one1, one2 = k1b.new_ones(*k1b.shape[:2], 1), k2b.new_ones(*k2b.shape[:2], 1)
        z1 = b1[..., None] if b1 is not None else torch.zeros_like(one1)
        z2 = b2[..., None] if b2 is not None else torch.zeros_like(one2)
        k1b, k2b = torch.cat([k1b, z1, one1], -1), torch.cat([k2b, one2, z2], -1)
    offsets = _offsets(ops)
    Z = ops.q.shape[0]
    v1, v2 = (v.reshape(Z, v.shape[1], -1).to(qa.dtype) for v in ops.values)
    out, _ = triangle_attention(qa, qc, k1a, k1b, k2b, k2c, v1, v2, causal=ops.causal,
                                causal_offset=offsets[0] - offsets[1], memory_budget=budget_bytes)
    return out.reshape(Z, ops.n, *ops.out_value_shape)
