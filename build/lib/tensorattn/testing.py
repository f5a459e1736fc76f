"""Test helpers shipped with the package: a float64 numpy brute-force reference for every spec, and
input builders that draw bounded random inputs for any spec.

The reference is written independently of the torch engine (plain numpy einsum over the full
score tensor); it exists to check the engine, never to serve users.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .spec import Spec, get_spec


def _rope_np(x: np.ndarray, pos: np.ndarray, base: float, layout: str) -> np.ndarray:
    d = x.shape[-1]
    out = np.empty_like(x)
    for l in range(d // 2):
        theta = base ** (-2.0 * l / d)
        ang = pos * theta
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = (2 * l, 2 * l + 1) if layout == "interleaved" else (l, l + d // 2)
        xa, xb = x[..., :, a:a + 1], x[..., :, b:b + 1]
        out[..., :, a:a + 1] = xa * c - xb * s
        out[..., :, b:b + 1] = xa * s + xb * c
    return out


def _block_views(spec: Spec, arrays: list[np.ndarray]) -> tuple[dict[str, int], list[dict[str, np.ndarray]]]:
    """Sizes of every feature letter, and for each slot its array per feature subscript: the array
    itself, or, for a slot that concatenates per-term blocks, each block (a slice of its last axis)."""
    lay = spec.slots
    sizes: dict[str, int] = {}
    for x, f in zip(arrays, lay.features):
        for c, s_ in zip(f, x.shape[x.ndim - len(f):]):
            sizes[c] = s_
    views: list[dict[str, np.ndarray]] = []
    for x, f, blocks in zip(arrays, lay.features, lay.blocks):
        if not blocks:
            views.append({f: x})
            continue
        given = dict(spec.block_sizes or {})
        parts = [given[b] for b in blocks] if all(b in given for b in blocks) else \
            [x.shape[-1] // len(blocks)] * len(blocks)
        starts = np.cumsum([0, *parts])
        views.append({b: x[..., starts[i]:starts[i + 1]] for i, b in enumerate(blocks)})
        sizes.update(zip(blocks, parts))
    return sizes, views


def reference_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    spec: str | Spec = "pairwise",
    causal: bool = False,
    scale: float | None = None,
    q_offset: int = 0,
    rope_base: float = 10000.0,
    rope_layout: str = "interleaved",
    rel: Any = None,
    alibi_slope: float | None = None,
    key_padding_mask: Any = None,
    attn_mask: Any = None,
) -> np.ndarray:
    """Brute-force float64 attention: materialize every score, softmax jointly over key tuples.

    For an attention polynomial the score is the sum of its terms (each term's einsum broadcast
    over the slots it does not name, times its coefficient), all times ``scale``. Causal: for a
    tree every child's position is at most its parent's; otherwise every key's is at most the
    query's.

    Masks as in ``ta.attention`` (bool True = masked, float = added); per-slot masks are sequences.
    A query with every key tuple masked gets 0."""
    spec = get_spec(spec)
    lay, ve = spec.slots, spec.value_einsum
    nk = spec.order - 1
    ks = [k] if spec.order == 2 and not isinstance(k, (list, tuple)) else list(k)
    vs = [v] if spec.order == 2 and not isinstance(v, (list, tuple)) else list(v)
    f64 = lambda a: np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)  # noqa: E731
    q, ks, vs = f64(q), [f64(x) for x in ks], [f64(x) for x in vs]
    arrays = [q, *ks]
    n = q.shape[-1 - len(lay.features[0])]
    ms = [x.shape[-1 - len(f)] for x, f in zip(ks, lay.features[1:])]
    qpos = np.arange(n) + q_offset
    kpos = [np.arange(m) for m in ms]
    if spec.positional == "rope":
        arrays = [_rope_np(arrays[0], qpos.astype(np.float64), rope_base, rope_layout),
                  _rope_np(arrays[1], kpos[0].astype(np.float64), rope_base, rope_layout)]
    sizes, views = _block_views(spec, arrays)
    D = spec.feature_dim(sizes)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ell = "..."
    if spec.positional == "relative":
        W = f64(rel)
        idx = qpos[:, None] - kpos[0][None, :] + (ms[0] - 1)
        s = np.einsum("...ia,ijab,...jb->...ij", arrays[0], W[idx], arrays[1]) * scale
        if alibi_slope:
            s = s - alibi_slope * np.abs(qpos[:, None] - kpos[0][None, :])
    else:
        s = 0.0
        for term in spec.terms:
            ops = [views[slot][f] for slot, f in zip(term.slots, term.einsum.features)]
            t = np.einsum(",".join(ell + op for op in term.einsum.operands) + "->" + ell + term.einsum.output, *ops)
            # move the term's slot axes to their global positions, size 1 on the others
            lead = t.ndim - term.order
            order = np.argsort(term.slots)
            t = np.transpose(t, [*range(lead), *(lead + o for o in order)])
            shape = list(t.shape[:lead]) + [1] * spec.order
            for slot in sorted(term.slots):
                shape[lead + slot] = (n, *ms)[slot]
            s = s + term.coefficient * t.reshape(shape)
        s = np.asarray(s) * scale
    if causal:
        pos = [qpos, *kpos]
        mask = np.ones(s.shape[-spec.order:], dtype=bool)
        for child, parent in spec.structure.causal_pairs:
            ok = pos[child][None, :] <= pos[parent][:, None]  # (parent tokens, child tokens)
            shape = [1] * spec.order
            shape[parent], shape[child] = ok.shape
            if child < parent:
                ok = ok.T
                shape[child], shape[parent] = ok.shape
            mask = mask & ok.reshape(shape)
        s = np.where(mask, s, -np.inf)
    s = s + _mask_bias(key_padding_mask, attn_mask, nk)
    axes = tuple(range(s.ndim - nk, s.ndim))
    top = s.max(axis=axes, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    total = p.sum(axis=axes, keepdims=True)
    p = p / np.where(total > 0, total, 1.0)
    vexpr = ell + "".join(lay.tokens) + "," + ",".join(ell + op for op in ve.operands) + "->" + ell + ve.output
    return np.einsum(vexpr, p, *vs)


def _as_bias(mask: Any) -> np.ndarray:
    m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    return np.where(m, -np.inf, 0.0) if m.dtype == bool else m.astype(np.float64)


def _mask_bias(key_padding_mask: Any, attn_mask: Any, nk: int) -> np.ndarray | float:
    """The additive bias of the masks, broadcastable to the scores (..., n, m_1, ..., m_nk)."""
    bias: Any = 0.0
    per_slot = lambda x: nk > 1 and isinstance(x, (list, tuple))  # noqa: E731
    if key_padding_mask is not None:
        for slot in range(nk):
            x = key_padding_mask[slot] if per_slot(key_padding_mask) else key_padding_mask
            if x is None:
                continue
            b = _as_bias(x)
            bias = bias + b.reshape(b.shape[:-1] + (1,) + tuple(b.shape[-1] if t == slot else 1 for t in range(nk)))
    if attn_mask is not None:
        if per_slot(attn_mask):
            for slot, x in enumerate(attn_mask):
                b = _as_bias(x)
                bias = bias + b.reshape(b.shape[:-1] + tuple(b.shape[-1] if t == slot else 1 for t in range(nk)))
        else:
            bias = bias + _as_bias(attn_mask)
    return bias


def random_inputs(
    spec: str | Spec = "pairwise",
    n: int = 16,
    d: int = 8,
    *,
    m: int | None = None,
    e: int | None = None,
    batch: tuple[int, ...] = (),
    bound: float = 1.0,
    sizes: dict[str, int] | None = None,
    dtype: Any = np.float32,
    seed: int = 0,
):
    """Uniform inputs in [-bound, bound] shaped for ``spec``: returns (q, k, v).

    For order 2, k and v are arrays; for higher orders they are tuples with one array per key slot.
    Every contracted index has size d unless ``sizes`` says otherwise; value indices have size e.
    """
    spec = get_spec(spec)
    lay, ve = spec.slots, spec.value_einsum
    rng = np.random.default_rng(seed)
    m = n if m is None else m
    e = d if e is None else e
    sizes = {c: d for c in spec.contracted} | dict(spec.block_sizes or {}) | (sizes or {})
    for f, blocks in zip(lay.features, lay.blocks):
        if blocks:  # a slot that concatenates per-term blocks: one axis, the sum of the blocks
            sizes[f] = sum(sizes[b] for b in blocks)
    draw = lambda shape: rng.uniform(-bound, bound, size=shape).astype(dtype)  # noqa: E731
    q = draw((*batch, n, *[sizes[c] for c in lay.features[0]]))
    ks = [draw((*batch, m, *[sizes[c] for c in f])) for f in lay.features[1:]]
    vs = [rng.uniform(-1, 1, size=(*batch, m, *[e] * len(letters))).astype(dtype) for letters in ve.value_letters]
    if spec.order == 2:
        return q, ks[0], vs[0]
    return q, tuple(ks), tuple(vs)


def random_rel(n: int, m: int, d: int, *, kind: str = "dense", q_offset: int = 0, bound: float = 1.0,
               seed: int = 0, dtype: Any = np.float32, rope_base: float = 10000.0) -> np.ndarray:
    """Relative-position matrices W of shape (q_offset+n+m-1, d, d).

    kind='dense': entries uniform in [-bound/sqrt(d), bound/sqrt(d)]; 'identity': W_t = I;
    'rope': W_t = the interleaved RoPE rotation by offset t - (m-1), so relative == rope."""
    L = q_offset + n + m - 1
    if kind == "identity":
        return np.broadcast_to(np.eye(d, dtype=dtype), (L, d, d)).copy()
    if kind == "rope":
        W = np.zeros((L, d, d))
        t = np.arange(L) - (m - 1)
        for l in range(d // 2):
            ang = t * rope_base ** (-2.0 * l / d)
            c, s = np.cos(ang), np.sin(ang)
            # q^T R(-i)^T... R_i^T R_j = R(j - i); s_ij = q^T R(i-j)^T k with R^T(i-j) = R(j-i)
            W[:, 2 * l, 2 * l] = c
            W[:, 2 * l, 2 * l + 1] = s
            W[:, 2 * l + 1, 2 * l] = -s
            W[:, 2 * l + 1, 2 * l + 1] = c
        return W.astype(dtype)
    rng = np.random.default_rng(seed)
    return rng.uniform(-bound, bound, size=(L, d, d)).astype(dtype) / np.sqrt(d)
