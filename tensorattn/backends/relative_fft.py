"""Relative-position attention by FFT-Toeplitz products (Alman & Song, Fast RoPE Attention).

The plan (``tensorattn.planning.relative``) expands P(s_ij) = sum_mu w_mu x_mu(i) T_mu(i-j) y_mu(j) and
groups the terms into Toeplitz kernels H_{alpha beta}, one per (row multiset alpha, column multiset
beta). With x_alpha, y_beta the degree-t monomials of q and k (``feature_map``) and u_beta = y_beta
[v | 1], the numerator and normalizer of every query are

    sum_t sum_alpha x_alpha(i) sum_beta (H_{alpha beta} * u_beta)(i)          (* = convolution)

Each convolution is a product in frequency space, so per frequency f the inner sum is the small
matrix product H^(f) u^(f) over beta. The kernels split into dense blocks (connected components of
the alpha-beta graph: one per degree for a dense W, many small ones for block-diagonal rotations);
blocks of one shape are batched into one matmul, whose columns are the batch times [v | 1]. Each
group's key columns are transformed apart, in block order, so that matmul reads the transforms in
place (no gather, no scatter). Kernels are transformed once and shared over the batch; the causal
mask and ALiBi are exact factors of every kernel. Everything runs in float64 (the FFT error is
normwise; see ``fft_roundoff``). With N >= n + m - 1 the FFT length, the cost is
O((kernels + C(d+g, g) e) N log N + kernels e N): near-linear in n.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..approx.features import augment, feature_map, query_weights
from ..approx.polynomials import get_approximant
from ..inputs import Operands
from ..planning.relative import DegreeTerms, toeplitz_terms

_F64 = torch.float64


@dataclass(frozen=True)
class TileGroup:
    """Dense blocks of one shape: rows (P, ra) alpha indices, cols (P, rb) beta indices and the kernel
    at every block entry (P, ra, rb), ``kernels`` (the zero kernel) where the block has none. The
    blocks' rows are disjoint, and so are their columns."""

    rows: np.ndarray
    cols: np.ndarray
    kernel_map: np.ndarray


def _segments(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order by label, the start of each label's segment, and each element's position in it."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    start = np.cumsum(counts) - counts
    pos = np.empty_like(labels)
    pos[order] = np.arange(labels.size) - start[labels[order]]
    return order, start, pos


@lru_cache(maxsize=64)
def degree_tiles(d: int, pairs: tuple[tuple[int, int], ...], g: int, t: int) -> tuple[TileGroup, ...]:
    """Dense blocks of the degree-t kernels (components of the alpha-beta graph), grouped by shape.
    Index arithmetic only; no loop over kernels."""
    dt = toeplitz_terms(d, pairs, g)[t]
    A, K = dt.n_alpha, dt.kernels
    ka, kb = dt.kernel_alpha, dt.kernel_beta
    graph = coo_matrix((np.ones(K), (ka, A + kb)), shape=(A + dt.n_beta,) * 2)
    _, label = connected_components(graph, directed=False)
    alphas, betas = np.unique(ka), np.unique(kb)  # only multisets that meet a kernel
    comp_a, comp_b = label[alphas], label[A + betas]
    order_a, start_a, pos_a = _segments(comp_a)
    order_b, start_b, pos_b = _segments(comp_b)
    comps = np.unique(comp_a)  # every component has a kernel, so rows and columns
    rows_in = np.bincount(comp_a, minlength=label.max() + 1)[comps]
    cols_in = np.bincount(comp_b, minlength=label.max() + 1)[comps]
    where_alpha = np.full(A, -1)
    where_alpha[alphas] = np.arange(alphas.size)
    where_beta = np.full(dt.n_beta, -1)
    where_beta[betas] = np.arange(betas.size)
    k_alpha, k_beta = where_alpha[ka], where_beta[kb]
    k_comp, k_row, k_col = comp_a[k_alpha], pos_a[k_alpha], pos_b[k_beta]
    shapes, shape_of = np.unique(np.stack([rows_in, cols_in], 1), axis=0, return_inverse=True)
    shape_of = shape_of.reshape(-1)
    groups = []
    for s, (ra, rb) in enumerate(shapes):  # a handful of block shapes
        members = comps[shape_of == s]
        slot = np.full(label.max() + 1, -1)
        slot[members] = np.arange(members.size)
        rows = alphas[order_a[start_a[members][:, None] + np.arange(ra)]]
        cols = betas[order_b[start_b[members][:, None] + np.arange(rb)]]
        kmap = np.full((members.size, ra, rb), K, np.int64)
        mine = slot[k_comp] >= 0
        kmap[slot[k_comp[mine]], k_row[mine], k_col[mine]] = np.nonzero(mine)[0]
        groups.append(TileGroup(rows, cols, kmap))
    return tuple(groups)


def _rfft(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``torch.fft.rfft(x, n=n, dim=dim)``. On the CPU, where autograd does not track ``x``, scipy's
    pocketfft computes it, with torch's thread count: 2.2-2.4x faster than torch's CPU FFT for the
    float64 transforms of this path (32,768 tokens, 65,536-point transforms of 175-259 columns).
    Both are FFTs with the normwise error the certificate assumes (``fft_roundoff``)."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return torch.fft.rfft(x, n=n, dim=dim)
    return torch.from_numpy(scipy.fft.rfft(x.detach().numpy(), n=n, axis=dim, workers=torch.get_num_threads()))


def _irfft(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``torch.fft.irfft(x, n=n, dim=dim)``, by scipy's pocketfft where ``_rfft`` uses it."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return torch.fft.irfft(x, n=n, dim=dim)
    return torch.from_numpy(scipy.fft.irfft(x.detach().numpy(), n=n, axis=dim, workers=torch.get_num_threads()))


def toeplitz_factor(ops: Operands, length: int, slope: float, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal mask and ALiBi as one Toeplitz factor over kk = i - j + m - 1, i.e. offset
    delta = q_offset + kk - (m - 1): [delta >= 0] exp(-slope |delta|)."""
    if not ops.causal and not slope:
        return None
    delta = torch.arange(length, device=ops.q.device, dtype=dtype) + (ops.q_offset - (ops.ms[0] - 1))
    f = torch.exp(-slope * delta.abs()) if slope else torch.ones_like(delta)
    return f * (delta >= 0) if ops.causal else f


class KernelSpectra:
    """Kernels H_{alpha beta}(kk) = factor(kk) sum_{mu in kernel} w_mu prod_{(a,b) in mu} W[a,b] and
    their rFFTs, for any subset of one degree's kernels."""

    def __init__(self, dt: DegreeTerms, Wp: torch.Tensor, weights: torch.Tensor, factor, N: int):
        self.dt, self.Wp, self.factor, self.N = dt, Wp, factor, N
        self.ptr = np.searchsorted(dt.kernel, np.arange(dt.kernels + 1))
        self.weights = weights[torch.as_tensor(dt.weight_index, device=Wp.device)]

    def products(self, mu: np.ndarray) -> torch.Tensor:
        """prod_{(a,b) in mu} W[a,b] at every offset for the terms ``mu``: (len(mu), L).

        Built one factor at a time over the distinct prefixes of the terms' (sorted) pair lists, so
        that terms sharing a prefix share its product: a degree-t level costs one multiply per
        distinct prefix instead of one per term and factor."""
        pairs = self.dt.pair_index[mu]  # (M, t), each row nondecreasing
        device = self.Wp.device
        if self.dt.t == 0:
            return self.Wp.new_ones(mu.size, self.Wp.shape[1])
        prod, parent_of = None, np.zeros(mu.size, np.int64)
        for s in range(self.dt.t):
            last = s == self.dt.t - 1  # full pair lists: one per term (the multisets are distinct)
            if last:
                rows, inverse = np.arange(mu.size), np.arange(mu.size)
            else:
                _, rows, inverse = np.unique(pairs[:, : s + 1], axis=0, return_index=True, return_inverse=True)
                inverse = inverse.reshape(-1)
            factor = self.Wp.index_select(0, torch.as_tensor(pairs[rows, s], device=device))
            if prod is not None:
                factor = factor * prod.index_select(0, torch.as_tensor(parent_of[rows], device=device))
            prod, parent_of = factor, inverse
        return prod

    def __call__(self, kernels: np.ndarray) -> torch.Tensor:
        """Spectra of the given kernels, frequency-major: (N//2 + 1, len(kernels)) complex."""
        lengths = self.ptr[kernels + 1] - self.ptr[kernels]
        offsets = np.cumsum(lengths) - lengths
        mu = np.repeat(self.ptr[kernels] - offsets, lengths) + np.arange(int(lengths.sum()))
        T = self.products(mu) * self.weights[torch.as_tensor(mu, device=self.Wp.device), None]  # terms x offsets
        if (lengths == 1).all():  # one term per kernel: the terms are the kernels
            H = T
        else:
            owner = torch.as_tensor(np.repeat(np.arange(kernels.size), lengths), device=T.device)
            H = T.new_zeros(kernels.size, T.shape[1]).index_add_(0, owner, T)
        if self.factor is not None:
            H = H * self.factor
        return _rfft(H, self.N, -1).T

    def tiles(self, kmap: np.ndarray) -> torch.Tensor:
        """Spectra of the kernels of blocks (p, ra, rb) (``TileGroup.kernel_map``, ``kernels`` for the zero
        kernel), laid out for the per-frequency products: (N//2 + 1, p, ra, rb), contiguous."""
        flat = kmap.reshape(-1)
        real = flat < self.dt.kernels
        if real.all():  # dense blocks: the kernels in block order, the transposed spectra copied once
            return self(flat).contiguous().view(-1, *kmap.shape)
        H = self(flat[real])
        out = H.new_zeros(H.shape[0], flat.size)
        out[:, torch.as_tensor(np.nonzero(real)[0], device=H.device)] = H
        return out.view(-1, *kmap.shape)


def relative_attention(plan, ops: Operands) -> torch.Tensor:
    """Certified relative-position attention (spec ``relative``) in O(n log n) per kernel."""
    rel = plan.relative
    g = plan.certificate.degree
    d, pairs = rel.support.d, rel.support.pairs
    tables = toeplitz_terms(d, pairs, g)
    Z, n, m = ops.q.shape[0], ops.n, ops.ms[0]
    N, F = rel.fft_len, rel.fft_len // 2 + 1
    cq, ck = plan.unit_divisors  # magnitudes near 1 for the monomials; the scale takes cq * ck
    q, k = ops.q.to(_F64) / cq, ops.keys[0].to(_F64) / ck
    v1 = augment(ops.values[0].to(_F64).reshape(Z, m, -1))
    if ops.key_bias:  # key mask: weight 0 drops a key from numerator and normalizer
        v1 = v1 * torch.exp(ops.key_bias[0].to(_F64))[..., None]
    c = v1.shape[-1]
    L = n + m - 1
    W = ops.rel.to(_F64)[ops.q_offset: ops.q_offset + L]  # kk = i - j + m - 1 reads W[q_offset + kk]
    pa = torch.as_tensor([p[0] for p in pairs], dtype=torch.long, device=q.device)
    pb = torch.as_tensor([p[1] for p in pairs], dtype=torch.long, device=q.device)
    Wp = W[:, pa, pb].T.contiguous()  # (|S|, L): the support's entries per offset
    coeffs = get_approximant(plan.approximant).coefficients(float(plan.beta), g)
    weights = torch.as_tensor(query_weights(coeffs, ops.scale * cq * ck, len(pairs), g), dtype=_F64, device=q.device)
    factor = toeplitz_factor(ops, L, float(rel.alibi_slope), _F64)
    xq, yk = feature_map(q, g), feature_map(k, g)  # (Z, n|m, C(d+g, g)), degree blocks in order
    budget = max(1, plan.request.memory_budget // 16)  # complex128 elements
    biggest = max(dt.n_alpha for dt in tables)
    z_chunk = max(1, min(Z, budget // (3 * biggest * c * F)))
    out = q.new_zeros(Z, n, c)
    first = 0
    for dt in tables:  # loop over degree
        block = slice(first, first + dt.n_alpha)
        first += dt.n_alpha
        if dt.kernels == 0:
            continue
        spectra = KernelSpectra(dt, Wp, weights, factor, N)
        # The path holds a group's u_hat and acc, (F, P rb | P ra, z c), whatever the budget; kernel
        # spectra of up to that size keep the chunks of a block group wide. The columns of each group
        # are transformed apart, in block order, so the per-frequency products read u_hat as it is.
        tile_budget = max(budget, F * dt.n_alpha * c * z_chunk)
        xq_t, yk_t = xq[:, :, block], yk[:, :, block]
        for grp in degree_tiles(d, pairs, g, dt.t):
            P, ra, rb = grp.kernel_map.shape
            per_row = (2 * F + L) * rb  # a block row's kernel spectra and their terms over L
            a_step = max(1, min(ra, tile_budget // per_row))
            p_step = max(1, tile_budget // (per_row * ra)) if a_step == ra else 1
            whole = p_step >= P and a_step >= ra  # one chunk: its product is the accumulator
            rows = torch.as_tensor(grp.rows.reshape(-1), device=q.device)
            cols = torch.as_tensor(grp.cols.reshape(-1), device=q.device)
            for z0 in range(0, Z, z_chunk):
                z1 = min(Z, z0 + z_chunk)
                zc = (z1 - z0) * c  # the batch sits with the value columns: every kernel serves all of it
                yg = yk_t[z0:z1][:, :, cols].permute(1, 2, 0)  # (m, P rb, z)
                u = (yg[..., None] * v1[z0:z1].transpose(0, 1)[:, None]).reshape(m, P * rb, zc)
                u_hat = _rfft(u, N, 0).reshape(F, P, rb, zc)  # frequency-major
                del u
                acc = None
                for p0 in range(0, P, p_step):
                    for a0 in range(0, ra, a_step):  # per frequency: H^(f) u^(f)
                        H = spectra.tiles(grp.kernel_map[p0: p0 + p_step, a0: a0 + a_step])  # (F, p, a, rb)
                        part = H @ u_hat[:, p0: p0 + p_step]  # (F, p, a, z c)
                        del H
                        if whole:
                            acc = part
                        else:
                            if acc is None:
                                acc = u_hat.new_empty(F, P, ra, zc)
                            acc[:, p0: p0 + p_step, a0: a0 + a_step] = part
                        del part
                del u_hat
                conv = _irfft(acc.reshape(F, P * ra, zc), N, 0)[m - 1: m - 1 + n]  # (n, P ra, z c)
                del acc
                conv = conv.reshape(n, P * ra, z1 - z0, c).permute(2, 0, 1, 3)  # (z, n, P ra, c)
                out[z0:z1] += torch.einsum("zna,znac->znc", xq_t[z0:z1][:, :, rows], conv)
    visible = ops.visible_rows()
    if visible is None:
        res = out[..., :-1] / out[..., -1:]
    else:  # a query that sees no unmasked key gets 0 (its normalizer is FFT roundoff, not 0)
        seen = visible[..., None]
        res = torch.where(seen, out[..., :-1] / torch.where(seen, out[..., -1:], 1.0), 0.0)
    return res.reshape(Z, n, *ops.out_value_shape).to(ops.dtype)


__all__ = ["KernelSpectra", "TileGroup", "degree_tiles", "relative_attention", "toeplitz_factor"]

