"""Masks as data: key padding masks and general attention masks, validated once, read per tile.

Conventions are ``torch.nn.MultiheadAttention``'s: a bool mask is True where attention is NOT
allowed, a float mask is added to the scores (0 keeps an entry, -inf removes it, other finite values
bias it). Note that ``torch.nn.functional.scaled_dot_product_attention`` uses the opposite bool
convention (True = take part).

- A **key mask** gives one bias per key; ``inputs.prepare`` turns it into ``(Z, m)`` per key slot
  (``Operands.key_bias``). A key tuple of an order-k spec gets the sum of its keys' biases, so it is
  masked when any of its keys is. exact adds the bias to the scores of each tile; the factorized
  engines (poly and the feature-map baselines) multiply each key's features by exp(bias), which is
  0 or 1 for a bool (or 0/-inf) mask and keeps the certificate (docs/design.md#masks).
- A **general mask** (``AttnMask``) gives one bias per (query, key tuple). It is kept as the
  caller's tensor, without a copy, and sliced per tile by the exact backend. A mask that equals
  the causal mask is detected by one chunked pass (``scan``) and runs as ``causal=True`` instead.

A query that sees no key tuple at all (every visible one masked) gets the output 0, on every
backend, and a zero gradient: the empty sum, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .registry import Refusal

#: elements of a mask read at once by ``scan``
_SCAN_CHUNK = 1 << 22


def _to_tensor(x: Any, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype == object:
            raise InputError(f"{name} must be a bool or float array, got an object array")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dtype != torch.bool and not x.is_floating_point():
        raise InputError(
            f"{name} has dtype {x.dtype}; a mask is bool (True = masked out, as in "
            f"torch.nn.MultiheadAttention) or float (added to the scores: 0 keeps, -inf masks). Fix: "
            f"{name}.bool() if nonzero means masked, or (1 - {name}).bool() for an HF-style 1 = keep mask"
        )
    if x.device != device:
        raise InputError(f"{name} is on {x.device} but q is on {device}; move them to one device")
    return x.detach()


def _check_values(t: torch.Tensor, name: str) -> None:
    """A float mask may hold finite values and -inf; NaN and +inf have no meaning as a bias."""
    if t.dtype == torch.bool:
        return
    bad = torch.isnan(t) | (t == float("inf"))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"{name} holds {t[first].item()} at index {first}; a float mask is added to the scores, so "
            "its entries must be finite (a bias) or -inf (masked). Fix: use -inf (or a bool mask) "
            "for masked entries"
        )


def _lead_of(t: torch.Tensor, name: str, lead: tuple[int, ...], trailing: int, what: str) -> tuple[int, ...]:
    """The mask's leading dims, left-padded with 1s to ``len(lead)``; each must be 1 or the input's."""
    own = tuple(t.shape[: t.ndim - trailing])
    if t.ndim < trailing or len(own) > len(lead):
        raise InputError(
            f"{name} has shape {tuple(t.shape)}; it needs {what} and at most {len(lead)} leading "
            f"dim(s) that broadcast to the inputs' leading (batch/head) dims {lead}"
        )
    padded = (1,) * (len(lead) - len(own)) + own
    for got, want in zip(padded, lead):
        if got not in (1, want):
            raise InputError(
                f"{name} has shape {tuple(t.shape)}: its leading dims {own} do not broadcast to the "
                f"inputs' leading dims {lead} (each must be 1 or equal). Fix: reshape the mask, e.g. "
                f"(batch, 1, ...) to share it over heads"
            )
    return padded


def key_bias(x: Any, name: str, lead: tuple[int, ...], m: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A key mask of shape broadcastable to ``(*lead, m)`` as an additive bias ``(Z, m)``."""
    t = _to_tensor(x, name, device)
    padded = _lead_of(t, name, lead, 1, f"the key dim (m={m}) last")
    if t.shape[-1] != m:
        raise InputError(
            f"{name} has shape {tuple(t.shape)} but its last dim must be the number of keys, m={m} "
            "(True/-inf marks a key to ignore)"
        )
    _check_values(t, name)
    if t.dtype == torch.bool:
        bias = torch.zeros(t.shape, dtype=dtype, device=device).masked_fill_(t, float("-inf"))
    else:
        bias = t.to(dtype)
    return bias.reshape(*padded, m).expand(*lead, m).reshape(math.prod(lead), m)


def is_binary(bias: torch.Tensor) -> bool:
    """True when every entry is 0 or -inf: key weights exp(bias) of 0 or 1."""
    return bool(((bias == 0) | (bias == float("-inf"))).all())


@dataclass(frozen=True)
class AttnMask:
    """A general mask: one tensor over ``(*lead, n, m_1, ..., m_{k-1})`` (``joint``), or one per key
    slot over ``(*lead, n, m_s)`` that masks a key tuple when any of its keys is masked for the
    query. Each part is the caller's tensor with its leading dims left-padded to ``len(lead)``; dims
    of size 1 broadcast. ``tile`` reads one tile."""

    parts: tuple[torch.Tensor, ...]
    joint: bool
    lead: tuple[int, ...]

    @property
    def order(self) -> int:
        return 1 + (self.parts[0].ndim - len(self.lead) - 1 if self.joint else len(self.parts))

    def _index(self, part: torch.Tensor, z0: int, z1: int) -> tuple | None:
        """Indices of the flattened batch rows z0..z1 into the part's leading dims (None: shared)."""
        L = len(self.lead)
        if all(s == 1 for s in part.shape[:L]):
            return None
        z = torch.arange(z0, z1, device=part.device)
        index = []
        stride = math.prod(self.lead)
        for size, own in zip(self.lead, part.shape[:L]):
            stride //= size
            index.append((z // stride) % size if own > 1 else 0)
        return tuple(index)

    def _slice(self, part: torch.Tensor, z0: int, z1: int, i0: int, i1: int, spans) -> torch.Tensor:
        L = len(self.lead)
        sl = [slice(i0, i1) if part.shape[L] > 1 else slice(0, 1)]
        for dim, (a, b) in zip(range(L + 1, part.ndim), spans):
            sl.append(slice(a, b) if part.shape[dim] > 1 else slice(0, 1))
        index = self._index(part, z0, z1)
        if index is None:
            return part[(0,) * L + tuple(sl)].unsqueeze(0)
        return part[index + tuple(sl)]

    def tile(self, z0: int, z1: int, i0: int, i1: int, spans, dtype: torch.dtype) -> torch.Tensor:
        """The mask on the tile (rows z0:z1, queries i0:i1, key spans), broadcastable to the score
        tile (Z', bq, b_1, ..., b_{k-1}): bool (True = masked) when every part is bool, else an
        additive float bias."""
        nk = self.order - 1
        if self.joint:
            pieces = [self._slice(self.parts[0], z0, z1, i0, i1, spans)]
        else:
            pieces = []
            for slot, part in enumerate(self.parts):
                t = self._slice(part, z0, z1, i0, i1, [spans[slot]])
                shape = [t.shape[0], t.shape[1]] + [1] * nk
                shape[2 + slot] = t.shape[2]
                pieces.append(t.reshape(shape))
        if all(p.dtype == torch.bool for p in pieces):
            out = pieces[0]
            for p in pieces[1:]:
                out = out | p
            return out
        out = None
        for p in pieces:
            b = (torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill_(p, float("-inf"))
                 if p.dtype == torch.bool else p.to(dtype))
            out = b if out is None else out + b
        return out


def attn_mask(x: Any, name: str, lead: tuple[int, ...], n: int, ms: tuple[int, ...],
              device: torch.device) -> AttnMask:
    """Validate a general mask: one array broadcastable to ``(*lead, n, *ms)``, or (order > 2) a
    sequence of one array per key slot, each broadcastable to ``(*lead, n, m_s)``."""
    nk = len(ms)
    per_slot = nk > 1 and isinstance(x, (list, tuple)) and len(x) == nk and all(
        isinstance(p, (torch.Tensor, np.ndarray)) for p in x)
    raw = list(x) if per_slot else [x]
    parts = []
    for slot, p in enumerate(raw):
        nm = f"{name}[{slot}]" if per_slot else name
        want = (n, ms[slot]) if per_slot else (n, *ms)
        what = f"(n, {'m' if nk == 1 or per_slot else ', '.join(f'm{s + 1}' for s in range(nk))}) = {want} last"
        t = _to_tensor(p, nm, device)
        padded = _lead_of(t, nm, lead, len(want), what)
        tail = tuple(t.shape[t.ndim - len(want):])
        if any(got not in (1, w) for got, w in zip(tail, want)):
            raise InputError(
                f"{nm} has shape {tuple(t.shape)}; its last {len(want)} dims must be {what.split(' = ')[0]} "
                f"= {want} (a dim of size 1 broadcasts)"
                + ("" if per_slot or nk == 1 else f"; or pass one (..., n, m_s) mask per key slot, "
                   f"{name}=({', '.join(f'mask{s + 1}' for s in range(nk))})")
            )
        parts.append(t.reshape(*padded, *tail))
    return AttnMask(tuple(parts), joint=not per_slot, lead=lead)


def scan(mask: AttnMask, n: int, ms: tuple[int, ...], offset: int | None, name: str) -> tuple[bool, str]:
    """Check the mask's values (one chunked pass, no copy of the mask) and whether it is the causal
    mask with queries at ``offset + i`` (key j visible iff j <= offset + i); ``offset=None`` skips
    the causal test. Returns (causal, where it first differs from the causal mask)."""
    L = len(mask.lead)
    nk = len(ms)
    causal = offset is not None
    where = ""
    for index, part in enumerate(mask.parts):
        nm = name if mask.joint else f"{name}[{index}]"
        slots = list(range(nk)) if mask.joint else [index]
        tail = tuple(part.shape[L:])
        if causal and (tail[0] != n or any(tail[1 + d] != ms[s] for d, s in enumerate(slots))):
            causal = False  # a broadcast dim cannot follow the diagonal
            where = f"{nm} has shape {tuple(part.shape)}, which broadcasts over queries or keys"
        per_row = max(1, part.numel() // max(1, tail[0]))
        chunk = max(1, _SCAN_CHUNK // per_row)
        for i0 in range(0, tail[0], chunk):
            t = part[(slice(None),) * L + (slice(i0, i0 + chunk),)]
            _check_values(t, nm)
            if not causal:
                continue
            qpos = torch.arange(i0, i0 + t.shape[L], device=t.device) + offset
            future = None
            for d, s in enumerate(slots):
                f = torch.arange(ms[s], device=t.device)[None, :] > qpos[:, None]
                shape = [f.shape[0]] + [1] * len(slots)
                shape[1 + d] = f.shape[1]
                f = f.reshape(shape)
                future = f if future is None else future | f
            ok = (t == future) if t.dtype == torch.bool else torch.where(future, t == float("-inf"), t == 0)
            if not bool(ok.all()):
                bad = tuple(int(i) for i in (~ok).nonzero()[0])
                keys = ", ".join(str(j) for j in bad[L + 1:])
                where = (f"{nm} is {t[bad].item()} at query {bad[L] + i0}, key{'s' if len(bad) > L + 2 else ''} "
                         f"{keys} (batch index {bad[:L]})")
                causal = False
    return causal, where


def visible_rows(key_bias: tuple[torch.Tensor | None, ...], n: int, causal: bool, q_pos: torch.Tensor,
                 k_pos: list[torch.Tensor]) -> torch.Tensor | None:
    """(Z, n) bool: True where the query sees at least one key tuple whose keys are all unmasked
    (None when no key is masked). The factorized engines give the other rows the output 0."""
    visible = None
    for slot, bias in enumerate(key_bias):
        if bias is None:
            continue
        live = bias > float("-inf")
        if bool(live.all()):
            continue
        if causal:  # key j is visible to query i iff k_pos[j] <= q_pos[i]; keys are in position order
            count = torch.cumsum(live.to(torch.int32), dim=1)
            last = torch.searchsorted(k_pos[slot], q_pos, right=True) - 1  # (n,) last visible key
            seen = count[:, last.clamp(min=0)] > 0
            rows = seen & (last >= 0)[None, :]
        else:
            rows = live.any(dim=1, keepdim=True).expand(-1, n)
        visible = rows if visible is None else visible & rows
    return visible


def factorized_refusal(problem) -> Refusal | None:
    """Why a factorized engine (poly, favor, taylor2) cannot apply this problem's masks, or None.

    They sum over keys once for every query, so they apply a per-key weight of 0 or 1 (a key mask)
    but neither a per-query mask nor a float key bias."""
    if problem is None:
        return None
    if problem.attn_mask:
        return Refusal(
            "attn_mask gives each query its own set of keys, which the factorized key sums cannot express; "
            "use backend='exact' (a causal attn_mask runs as causal=True, and one that is the same for "
            "every query runs as a key mask)"
        )
    if problem.key_mask == "additive":
        return Refusal(
            "the float key mask holds values other than 0 and -inf (a per-key bias); factorized backends "
            "apply key weights of 0 or 1 only (bool masks, or float masks of 0 and -inf); use backend='exact'"
        )
    return None
