"""Relative-position attention by FFT-Toeplitz products (Alman & Song, Fast RoPE Attention).

The plan (``tensorattn.planning.relative``) expands P(s_ij) = sum_mu w_mu x_mu(i) T_mu(i-j) y_mu(j) and
groups the terms into Toeplitz kernels H_{alpha beta}, one per (row multiset alpha, column multiset
beta). With x_alpha, y_beta the degree-t monomials of q and k (``feature_map``) and u_beta = y_beta
[v | 1], the numerator and normalizer of every query are

    sum_t sum_alpha x_alpha(i) sum_beta (H_{alpha beta} * u_beta)(i)          (* = convolution)

Each convolution is a product in frequency space, so per frequency f the inner sum is the small
matrix product H^(f) u^(f) over beta. The kernels split into dense blocks (connected components of
the alpha-beta graph: one per degree for a dense W, many small ones for block-diagonal rotations);
blocks of one shape are batched into one matmul. Kernels are transformed once and shared over the
batch; the causal mask and ALiBi are exact factors of every kernel. Everything runs in float64
(the FFT error is normwise; see ``fft_roundoff``). With N >= n + m - 1 the FFT length, the cost is
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
    at every block entry (P, ra, rb), ``kernels`` (the zero kernel) where the block has none."""

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
def degree_tiles(d: int, pairs: tuple[tuple[int, int], ...], g: int, t: int, max_rows: int) -> tuple[TileGroup, ...]:
    """Dense blocks of the degree-t kernels (components of the alpha-beta graph), rows chunked to
    at most ``max_rows``, grouped by shape. Index arithmetic only; no loop over kernels."""
    dt = toeplitz_terms(d, pairs, g)[t]
    A, K = dt.n_alpha, dt.kernels
    ka, kb = dt.kernel_alpha, dt.kernel_beta
    graph = coo_matrix((np.ones(K), (ka, A + kb)), shape=(A + dt.n_beta,) * 2)
    _, label = connected_components(graph, directed=False)
    alphas, betas = np.unique(ka), np.unique(kb)  # only multisets that meet a kernel
    comp_a, comp_b = label[alphas], label[A + betas]
    order_a, start_a, pos_a = _segments(comp_a)
    order_b, start_b, pos_b = _segments(comp_b)
    rows_in = np.bincount(comp_a, minlength=label.max() + 1)
    cols_in = np.bincount(comp_b, minlength=label.max() + 1)
    chunk = pos_a // max_rows  # row chunk of each alpha within its component
    tile_key = comp_a * (A + 1) + chunk
    tiles, tile_of_alpha = np.unique(tile_key, return_inverse=True)
    tile_comp, tile_chunk = tiles // (A + 1), tiles % (A + 1)
    tile_ra = np.minimum(max_rows, rows_in[tile_comp] - tile_chunk * max_rows)
    tile_rb = cols_in[tile_comp]
    where_alpha = np.full(A, -1)
    where_alpha[alphas] = np.arange(alphas.size)
    where_beta = np.full(dt.n_beta, -1)
    where_beta[betas] = np.arange(betas.size)
    k_alpha = where_alpha[ka]
    k_tile, k_row, k_col = tile_of_alpha[k_alpha], pos_a[k_alpha] % max_rows, pos_b[where_beta[kb]]
    shapes, shape_of_tile = np.unique(np.stack([tile_ra, tile_rb], 1), axis=0, return_inverse=True)
    shape_of_tile = shape_of_tile.reshape(-1)
    groups = []
    for s, (ra, rb) in enumerate(shapes):  # a handful of block shapes
        members = np.nonzero(shape_of_tile == s)[0]
        slot = np.full(tiles.size, -1)
        slot[members] = np.arange(members.size)
        first_row = start_a[tile_comp[members]] + tile_chunk[members] * max_rows
        rows = alphas[order_a[first_row[:, None] + np.arange(ra)]]
        cols = betas[order_b[start_b[tile_comp[members]][:, None] + np.arange(rb)]]
        kmap = np.full((members.size, ra, rb), K, np.int64)
        mine = slot[k_tile] >= 0
        kmap[slot[k_tile[mine]], k_row[mine], k_col[mine]] = np.nonzero(mine)[0]
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
        # The path holds u_hat and acc, (z, F, n_alpha, c) each, whatever the budget; kernel spectra
        # of up to that size keep the row chunks of a component wide (>= c rows typically). Narrow
        # row chunks gather the component's column block once per chunk, and their number grows
        # with F: the products then cost O(F^2) instead of O(F). The per-frequency products are
        # chunked over frequencies instead, within the budget.
        tile_budget = max(budget, F * dt.n_alpha * c * z_chunk)
        rb_max = max(1, int(np.bincount(dt.kernel_alpha).max()))
        max_rows = max(1, min(dt.n_alpha, tile_budget // ((2 * F + L) * rb_max)))
        groups = degree_tiles(d, pairs, g, dt.t, max_rows)
        # every row a tile writes (the tiles' rows are disjoint); zeros only if some have no kernel
        covered = sum(grp.rows.size for grp in groups) == dt.n_alpha
        for z0 in range(0, Z, z_chunk):
            z1 = min(Z, z0 + z_chunk)
            u = yk[z0:z1, :, block, None] * v1[z0:z1, :, None, :]  # (z, m, n_beta, c)
            u_hat = _rfft(u, N, 1).contiguous()  # frequency-major (z, F, n_beta, c)
            acc = (u_hat.new_empty if covered else u_hat.new_zeros)(z1 - z0, F, dt.n_alpha, c)
            for grp in groups:
                P, ra, rb = grp.kernel_map.shape
                # kernel spectra of `step` tiles at a time: (F, step ra rb) plus their terms over L
                step = max(1, tile_budget // (F * ra * rb * 2 + L * ra * rb))
                for p0 in range(0, P, step):
                    kmap = grp.kernel_map[p0: p0 + step]
                    used, local = np.unique(kmap, return_inverse=True)
                    real = used[used < dt.kernels]
                    H = spectra(real)
                    H = torch.cat([H, H.new_zeros(F, used.size - real.size)], dim=1)  # the zero kernel, if any
                    Ht = H[:, torch.as_tensor(local.reshape(kmap.shape), device=H.device)]  # (F, p, ra, rb)
                    del H
                    cols = torch.as_tensor(grp.cols[p0: p0 + step], device=Ht.device)
                    rows = torch.as_tensor(grp.rows[p0: p0 + step].reshape(-1), device=Ht.device)
                    p = kmap.shape[0]
                    fstep = max(1, budget // (p * (ra + rb) * c * (z1 - z0) * 2))
                    for f0 in range(0, F, fstep):  # per frequency: H^(f) u^(f)
                        f1 = min(F, f0 + fstep)
                        Ut = u_hat[:, f0:f1, cols]  # (z, f, p, rb, c)
                        acc[:, f0:f1, rows] = (Ht[f0:f1] @ Ut).reshape(z1 - z0, f1 - f0, -1, c)
            conv = torch.fft.irfft(acc, n=N, dim=1)[:, m - 1: m - 1 + n]  # (z, n, n_alpha, c)
            out[z0:z1] = out[z0:z1] + torch.einsum("zna,znac->znc", xq[z0:z1, :, block], conv)
    visible = ops.visible_rows()
    if visible is None:
        res = out[..., :-1] / out[..., -1:]
    else:  # a query that sees no unmasked key gets 0 (its normalizer is FFT roundoff, not 0)
        seen = visible[..., None]
        res = torch.where(seen, out[..., :-1] / torch.where(seen, out[..., -1:], 1.0), 0.0)
    return res.reshape(Z, n, *ops.out_value_shape).to(ops.dtype)


__all__ = ["KernelSpectra", "TileGroup", "degree_tiles", "relative_attention", "toeplitz_factor"]

