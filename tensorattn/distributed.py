"""Sequence-parallel attention on torch.distributed, forward and backward (docs/distributed.md).

Each rank of a process group holds a contiguous shard of positions of q, k and v (rank order is
position order) and gets back its shard of the output; gradients flow back to every rank's shards.
Nothing here computes attention itself: validation is ``inputs.prepare`` with the shard's global
offsets, the plan is ``plan_for`` on the global sizes and the all-reduced operand maxima (so every
rank picks the same degree and reports the one-process certificate), and the math runs in the
existing engines:

* ``poly``: the factorized engine of backends/poly.py, differentiated by autograd on each rank.
  Its per-slot key statistics S_m = U_m^T [v_m | 1] (r x (e+1)) are sums over key positions, so
  the global S_m is the sum of the ranks' partial sums: one all_reduce, inside an autograd.Function
  whose backward all-reduces dL/dS_m (a sum over query positions). Causal attention starts the
  local prefix states at the exclusive prefix of the other ranks' totals (an all_gather); its
  backward gives each rank the suffix sum of the other ranks' gradients (one all_gather). The
  traffic is O(r e) per rank, independent of n, in both passes.
* ``exact``: ring passing of K/V blocks with the streaming tile engine of backends/exact.py on each
  (query shard, key block) pair and a log-sum-exp merge of the partial results, so no rank ever
  holds all keys. Its backward (an autograd.Function) passes the K/V blocks round the ring again,
  recomputes each tile from the saved global log-sum-exp, and lets the dK/dV accumulators of each
  block travel with it and return to its owner. Causal attention turns both rings into pipelines
  that never send a block to a rank whose queries all precede it.

Spec ``relative`` runs on the exact ring (W is indexed with global positions); its poly
FFT-Toeplitz path is refused (see ``_RELATIVE_POLY``). Importing this module initializes nothing;
only ``attention`` talks to the process group.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .api import (
    AttentionInfo,
    check_fits,
    gradient_overflow_error,
    gradient_overflows,
    on_unit_values,
    planned_backward,
)
from .backends.exact import TileEngine, backward_buffers, stream_backward, stream_forward
from .backends.poly import polynomial_engine
from .errors import InputError
from .inputs import Operands, check_finite, full_precision, full_precision_backward, prepare
from .planning import OperandMaxima, certify_gradients, operand_maxima, plan_for
from .planning.cost import EXACT_STEP_BYTES
from .request import Request, with_call_signature
from .spec import Spec, get_spec

#: backends that have a sequence-parallel implementation here
DISTRIBUTED_BACKENDS = ("auto", "exact", "poly")
#: a ring piece of the innermost key slot holds at most min(memory_budget, EXACT_STEP_BYTES) /
#: RING_PIECE_FRACTION bytes of K/V, so the blocks in flight (about five in the backward) stay within
#: the tile budget
RING_PIECE_FRACTION = 8
#: why spec 'relative' has no poly path across ranks (docs/distributed.md#relative-positions)
_RELATIVE_POLY = (
    "backend='poly' for spec 'relative' has no sequence-parallel implementation: its FFT-Toeplitz "
    "path convolves every kernel over the whole sequence, so each rank would need the key "
    "features y(k_j)[v_j | 1] of every other rank, C(d+g, g)*(e+1) numbers per token: more traffic "
    "than the exact ring's d+e, not less. Fix: backend='exact' (the ring, with exact gradients), "
    "or ta.attention(..., spec='relative', backend='poly') on one process, or spec='rope' when "
    "W[t] is a rotation by t (its poly path runs across ranks)"
)


# --------------------------------------------------------------------------- byte accounting


@dataclass
class CommLog:
    """Payload bytes this rank sent and received, per collective.

    Conventions (logical payload, not wire bytes): ``all_reduce`` counts its buffer once each way
    (a ring all-reduce moves about 2(P-1)/P times that over the wire); ``all_gather`` sends the
    local buffer and receives the P-1 others; point-to-point counts what is sent or received.
    """

    sent: int = 0
    received: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    received_by_op: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.calls[op] = self.calls.get(op, 0) + 1
        self.received_by_op[op] = self.received_by_op.get(op, 0) + received


_ACTIVE_LOGS: list[CommLog] = []


@contextmanager
def count_bytes() -> Iterator[CommLog]:
    """Count the bytes this rank exchanges inside the block.

    >>> with ta.distributed.count_bytes() as log:
    ...     pass
    >>> log.sent, log.received
    (0, 0)
    """
    log = CommLog()
    _ACTIVE_LOGS.append(log)
    try:
        yield log
    finally:
        _ACTIVE_LOGS.remove(log)


def _record(op: str, sent: int, received: int) -> None:
    for log in _ACTIVE_LOGS:
        log.add(op, sent, received)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Comm:
    """The collectives this module uses, on one group, each recording its payload."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def all_gather_object(self, obj: Any, op: str = "handshake") -> list:
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        size = len(pickle.dumps(obj))
        _record(op, size, sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank))
        return out

    def all_reduce(self, t: torch.Tensor, op, name: str) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        _record(name, _nbytes(t), _nbytes(t))
        return t

    def all_gather(self, t: torch.Tensor, name: str) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        _record(name, _nbytes(t), (self.world - 1) * _nbytes(t))
        return out

    def exchange(self, sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]],
                 op: str) -> list:
        """Post point-to-point sends and receives, each ``(tensor, group rank, tag)``, as one batch
        (safe on NCCL too); returns the requests to wait on."""
        ops = [dist.P2POp(dist.isend, t, self.global_rank(peer), self.group, tag) for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(peer), self.group, tag) for t, peer, tag in recvs]
        if not ops:
            return []
        _record(op, sum(_nbytes(t) for t, _, _ in sends), sum(_nbytes(t) for t, _, _ in recvs))
        return dist.batch_isend_irecv(ops)


def _communicator(group) -> _Comm:
    if not dist.is_available():
        raise InputError(
            "ta.distributed.attention needs torch.distributed, which this torch build lacks "
            "(torch.distributed.is_available() is False). Fix: install a torch build with "
            "distributed support, or use ta.attention on one process"
        )
    if not dist.is_initialized():
        raise InputError(
            "ta.distributed.attention needs an initialized process group, but "
            "torch.distributed.is_initialized() is False. Fix: launch with "
            "`torchrun --nproc_per_node=N script.py` and call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) before the "
            "call, or use ta.attention on one process"
        )
    if group is not None and dist.get_rank(group) < 0:
        raise InputError(
            f"this process (global rank {dist.get_rank()}) is not a member of group={group!r}; "
            "call ta.distributed.attention only on the ranks of the group you pass"
        )
    return _Comm(group)


# --------------------------------------------------------------------------- collective checks


@dataclass(frozen=True)
class ShardLayout:
    """Where each rank's shard sits in the global sequence."""

    q_lengths: tuple[int, ...]
    k_lengths: tuple[tuple[int, ...], ...]  # per key slot, per rank

    @staticmethod
    def _starts(lengths) -> tuple[int, ...]:
        return tuple(sum(lengths[:r]) for r in range(len(lengths)))

    def q_start(self, rank: int) -> int:
        return self._starts(self.q_lengths)[rank]

    def k_start(self, slot: int, rank: int) -> int:
        return self._starts(self.k_lengths[slot])[rank]

    @property
    def n(self) -> int:
        return sum(self.q_lengths)

    @property
    def ms(self) -> tuple[int, ...]:
        return tuple(sum(lengths) for lengths in self.k_lengths)


def _call_signature(spec: Spec, request: Request, options: dict) -> tuple:
    """What every rank must agree on; arrays are compared by shape only."""
    opts = tuple(sorted(
        (k, tuple(v.shape) if isinstance(v, (torch.Tensor, np.ndarray)) else repr(v)) for k, v in options.items()
    ))
    return (
        ("spec", (spec.name, spec.score, spec.value, spec.positional)),
        *((f, repr(getattr(request, f))) for f in Request.names()), ("options", opts),
    )


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def _relative_matrix(W: Any, q: Any) -> torch.Tensor:
    """The whole W of spec 'relative', checked on its own (its length needs the global sizes)."""
    d = np.shape(q)[-1] if np.ndim(q) else None
    if W is None:
        raise InputError(
            f"spec 'relative' needs rel=W with shape (n+m-1, {d}, {d}): W[i-j+m-1] is the matrix "
            "between query i and key j, with n and m the lengths of the whole sequence (all ranks "
            "together); every rank passes the same whole W"
        )
    Wt = _as_tensor(W)
    if not Wt.is_floating_point():
        raise InputError(f"rel (W) has dtype {Wt.dtype}; it must be floating point. Fix: cast it to float32")
    if Wt.ndim != 3 or tuple(Wt.shape[1:]) != (d, d):
        raise InputError(
            f"rel (W) has shape {tuple(Wt.shape)} but needs (n+m-1, {d}, {d}) for the whole sequence "
            f"(d={d} from q); every rank passes the same whole W"
        )
    check_finite(Wt, "rel")
    return Wt


def _rel_stand_in(W: torch.Tensor, q: Any, k: Any, v: Any, q_offset: int) -> torch.Tensor:
    """A zero-stride stand-in for W with the shape ``prepare`` expects for this shard alone, so
    that it validates the shard; the whole W replaces it once the layout is known."""
    k0 = k[0] if isinstance(k, (list, tuple)) and len(k) == 1 else k
    v0 = v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v
    n, m, d = np.shape(q)[-2], np.shape(k0)[-2], np.shape(q)[-1]
    f64 = any("float64" in str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype) for x in (q, k0, v0))
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64 if f64 else torch.float32, device=device)
    return zero.expand(max(1, q_offset + n + m - 1), d, d)


#: the mask keywords of ``ta.attention``, which the sequence-parallel frontend takes only as None
_MASK_KEYWORDS = ("key_padding_mask", "attn_mask")


def _local_description(spec_arg, q, k, v, call: dict[str, Any]
                       ) -> tuple[dict, tuple | None, BaseException | None]:
    """Validate this rank's shard alone; never raise, so that every rank reaches the handshake."""
    try:
        spec = get_spec(spec_arg)
        # the mask keywords of ta.attention: None (no mask) is accepted, a mask is refused
        masked = [name for name in _MASK_KEYWORDS if call.get(name) is not None]
        if masked:
            raise InputError(
                f"{' and '.join(masked)} cannot be passed to ta.distributed.attention: the sequence-parallel "
                "frontend has no masks (causal=True is its one mask). Fix: use causal=True for a causal mask, "
                "drop padded key tokens from the shards, or call ta.attention on one process, which takes both"
            )
        request, options = Request.from_call(spec, **{name: x for name, x in call.items()
                                                     if name not in _MASK_KEYWORDS})
        if request.backend not in DISTRIBUTED_BACKENDS:
            raise InputError(
                f"backend={request.backend!r} has no sequence-parallel implementation; "
                f"ta.distributed.attention supports {', '.join(map(repr, DISTRIBUTED_BACKENDS))}"
            )
        relative = spec.positional == "relative"
        if not spec.separable and not relative:
            raise InputError(
                f"spec {spec.name!r} is not separable and has no sequence-parallel implementation; "
                "use ta.attention on one process"
            )
        if spec.is_polynomial:
            if request.backend == "poly":
                raise InputError(
                    f"backend='poly' for the attention polynomial {spec.name!r} has no sequence-parallel "
                    "implementation (its methods contract states that span the whole sequence per term). Use "
                    "backend='exact' (the ring over key tuples) here, or ta.attention(..., backend='poly') on "
                    "one process"
                )
            request = replace(request, backend="exact")  # 'auto' too: poly has no ring form here
        if request.q_offset is not None:
            raise InputError(
                f"q_offset={request.q_offset!r} cannot be passed to ta.distributed.attention: "
                "each rank's query offset is the global position of its shard (the sum of the "
                "shard lengths of lower ranks)"
            )
        W, local_options, rel_meta = None, options, None
        if relative:
            if request.backend == "poly":
                raise InputError(_RELATIVE_POLY)
            request = replace(request, backend="exact")  # 'auto' too: see _RELATIVE_POLY
            W = _relative_matrix(options.get("rel"), q)
            local_options = {**options, "rel": _rel_stand_in(W, q, k, v, 0)}
            with torch.no_grad():  # a fingerprint: every rank must hold the same W
                w64 = W.detach().to(torch.float64)
                rel_meta = (tuple(W.shape), float(w64.sum()), float((w64 * w64).sum()))
        ops = prepare(spec, q, k, v, replace(request, causal=False), local_options)
        nk = spec.order - 1
        names = ["q", *(["k"] if nk == 1 else [f"k[{i}]" for i in range(nk)]),
                 *(["v"] if nk == 1 else [f"v[{i}]" for i in range(nk)]), *(["rel"] if relative else [])]
        tensors = [ops.q, *ops.keys, *ops.values, *([W] if relative else [])]
        grads = tuple(nm for nm, t in zip(names, tensors) if torch.is_grad_enabled() and t.requires_grad)
        meta = dict(
            error=None, signature=_call_signature(spec, request, options),
            lead=ops.lead, n=ops.n, ms=ops.ms, sizes=ops.sizes, value_sizes=ops.value_sizes,
            dtype=str(ops.dtype), device=ops.device.type, grads=grads, rel=rel_meta,
        )
        return meta, (spec, request, options, W), None
    except Exception as exc:  # shipped to every rank by the handshake, re-raised there
        return dict(error=f"{type(exc).__name__}: {exc}"), None, exc


def _check_shards(metas: list[dict], causal: bool) -> ShardLayout:
    """Raise the same InputError on every rank when the shards do not form one sequence."""
    failed = [(r, m["error"]) for r, m in enumerate(metas) if m["error"] is not None]
    if failed:
        raise InputError(
            "ta.distributed.attention failed on " + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        )
    first = metas[0]
    for r, m in enumerate(metas[1:], start=1):
        for (key, mine), (_, theirs) in zip(m["signature"], first["signature"]):
            if mine != theirs:
                raise InputError(
                    f"ranks disagree on {key}: rank 0 passed {theirs!r} but rank {r} passed {mine!r}; "
                    "every rank must call ta.distributed.attention with the same arguments"
                )
    per_rank = lambda key: ", ".join(f"rank {r}: {m[key]}" for r, m in enumerate(metas))  # noqa: E731
    if len({m["lead"] for m in metas}) > 1:
        raise InputError(
            f"leading (batch/head) dims differ across ranks ({per_rank('lead')}); each rank holds "
            "positions of the same batch and heads, so they must be equal. Fix: shard along the "
            "sequence dim only"
        )
    for key, what in (("sizes", "feature"), ("value_sizes", "value")):
        for letter in first[key]:
            vals = [m[key].get(letter) for m in metas]
            if len(set(vals)) > 1:
                listing = ", ".join(f"rank {r}: {letter}={s}" for r, s in enumerate(vals))
                raise InputError(
                    f"{what} size {letter!r} differs across ranks ({listing}); only the sequence "
                    "dim is sharded, so every rank needs the same head/feature sizes. Fix: shard "
                    "along the sequence dim only"
                )
    if len({m["dtype"] for m in metas}) > 1 or len({m["device"] for m in metas}) > 1:
        raise InputError(
            f"compute dtypes or device types differ across ranks ({per_rank('dtype')}; "
            f"{per_rank('device')}); cast every shard to one dtype and device type"
        )
    if len({m["grads"] for m in metas}) > 1:
        listing = ", ".join(f"rank {r}: {', '.join(m['grads']) or 'none'}" for r, m in enumerate(metas))
        raise InputError(
            f"the inputs that require grad differ across ranks ({listing}); the backward pass is "
            "collective, so every rank must track the same inputs. Fix: set requires_grad alike on "
            "every rank, or call it under torch.no_grad() on every rank"
        )
    if len({m["rel"] for m in metas}) > 1:
        raise InputError(
            "rel (W) differs across ranks (shape, sum, sum of squares: "
            f"{per_rank('rel')}); every rank passes the same whole W of shape (n+m-1, d, d), with n "
            "and m the lengths of the whole sequence"
        )
    empty = [r for r, m in enumerate(metas) if m["n"] == 0]
    if empty:
        raise InputError(
            f"rank(s) {empty} hold 0 queries ({per_rank('n')}); every rank needs at least one "
            "position. Fix: use fewer ranks than positions"
        )
    if causal and any(m["ms"] != (m["n"],) * len(m["ms"]) for m in metas):
        raise InputError(
            "causal=True needs each rank to hold the same positions of q and k, but the shard "
            f"lengths are q: {per_rank('n')}; k: {per_rank('ms')}. Fix: split q, k and v at the "
            "same positions"
        )
    nk = len(first["ms"])
    layout = ShardLayout(
        q_lengths=tuple(m["n"] for m in metas),
        k_lengths=tuple(tuple(m["ms"][s] for m in metas) for s in range(nk)),
    )
    if first["rel"] is not None:
        length, want = first["rel"][0][0], layout.n + layout.ms[0] - 1
        if length != want:
            raise InputError(
                f"rel (W) has {length} matrices but the whole sequence needs n+m-1 = {layout.n}+"
                f"{layout.ms[0]}-1 = {want}: W[i-j+m-1] sits between query i and key j at their global "
                "positions. Fix: pass the same whole W on every rank"
            )
    return layout


# --------------------------------------------------------------------------- poly


class _SumOverRanks(torch.autograd.Function):
    """S = sum over ranks of S_r (all_reduce). dL/dS_r = sum over ranks of dL/dS: each rank's
    queries contribute to dL/dS, a sum over query positions, so the backward is one all_reduce."""

    @staticmethod
    def forward(ctx, comm: _Comm, name: str, partial: torch.Tensor) -> torch.Tensor:
        ctx.comm, ctx.name = comm, name
        return comm.all_reduce(partial.clone(), dist.ReduceOp.SUM, name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.comm.all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.name + "_grad")


class _SumOfLowerRanks(torch.autograd.Function):
    """Rank r gets sum_{s < r} T_s (causal: the keys of lower ranks are all visible). T_s enters
    rank r > s, so dL/dT_s = sum_{r > s} G_r: an all_gather of the gradients, summed above."""

    @staticmethod
    def forward(ctx, comm: _Comm, name: str, total: torch.Tensor) -> torch.Tensor:
        ctx.comm, ctx.name = comm, name
        gathered = comm.all_gather(total, name)
        return sum(gathered[: comm.rank], torch.zeros_like(total))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm = ctx.comm
        gathered = comm.all_gather(grad.contiguous(), ctx.name + "_grad")
        return None, None, sum(gathered[comm.rank + 1:], torch.zeros_like(grad))


def _poly(plan, ops: Operands, comm: _Comm, layout: ShardLayout) -> torch.Tensor:
    """Factorized attention with the key statistics summed over ranks; autograd differentiates the
    local engine and the two reductions above carry the gradients of the statistics across ranks."""
    engine = polynomial_engine(plan, ops, factorized=True)  # the key states are summed across ranks
    nk = ops.order - 1
    states = [engine.key_state(s) for s in range(nk)]  # (Z, r, e_m + 1) each
    flat = torch.cat([s.reshape(-1) for s in states])
    split = lambda buf: [  # noqa: E731
        part.reshape(s.shape) for part, s in zip(buf.split([s.numel() for s in states]), states)
    ]
    if not ops.causal:
        # sum_m over all keys = sum over ranks of the shards' partial sums: one all_reduce
        out = engine.apply_queries(engine.combine(split(_SumOverRanks.apply(comm, "poly_states", flat))))
    else:
        # keys of lower ranks are all visible: start the prefix at their summed totals
        initial = split(_SumOfLowerRanks.apply(comm, "poly_prefix", flat))
        out = engine.causal(initial=initial, key_offset=layout.k_start(0, comm.rank))
    return out.reshape(out.shape[0], ops.n, *ops.out_value_shape).to(ops.dtype)


# --------------------------------------------------------------------------- exact ring


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf: torch.Tensor, kshape: tuple[int, ...], vshape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a packed K/V (or dK/dV) buffer."""
    kn = math.prod(kshape)
    return buf[:kn].reshape(kshape), buf[kn:].reshape(vshape)


def _pieces(lengths: tuple[int, ...], tokens: int) -> list[tuple[tuple[int, int], ...]]:
    """Per piece, each rank's token range [a, b) of its shard (empty past its end): every rank
    walks the same pieces, so the rings stay in step whatever the shard lengths."""
    count = max(1, max(math.ceil(length / tokens) for length in lengths))
    return [tuple((min(c * tokens, n), min((c + 1) * tokens, n)) for n in lengths) for c in range(count)]


def _merge(acc, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Log-sum-exp merge of two partial softmax results over disjoint key sets (in place on the
    accumulated ``acc`` and on ``out_b``, which the caller hands over)."""
    extra = (1,) * (out_b.ndim - 2)
    # a row that saw no key in a block has lse -inf and out 0/0: give it weight 0 and value 0
    out_b = out_b.masked_fill_(~torch.isfinite(lse_b).reshape(*lse_b.shape, *extra), 0.0)
    if acc is None:
        return out_b, lse_b
    out_a, lse_a = acc
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe).reshape(*lse.shape, *extra)
    wb = torch.exp(lse_b - safe).reshape(*lse.shape, *extra)
    return out_a.mul_(wa).add_(out_b.mul_(wb)), lse


@dataclass
class _ExactRing:
    """Ring attention over the ranks for one call: the forward and the recomputing backward.

    Key slot s circulates round the ring (nested rings for order > 2: slot s+1 goes round once per
    block of slot s). The innermost slot travels in pieces of at most min(memory_budget,
    EXACT_STEP_BYTES) / RING_PIECE_FRACTION bytes, so the blocks in flight stay within the tile budget.
    """

    comm: _Comm
    layout: ShardLayout
    ops: Operands  # this rank's operands: positions, scale, spec
    budget: int
    spans: list  # per key slot: the pieces of every rank's shard (see _pieces)

    @classmethod
    def build(cls, ops: Operands, comm: _Comm, layout: ShardLayout, budget: int) -> "_ExactRing":
        nk = ops.order - 1
        spans = []
        for s in range(nk):
            lengths = layout.k_lengths[s]
            tokens = max(lengths)  # outer slots: whole shards (a piece would multiply the inner traffic)
            if s == nk - 1:
                k, v = ops.keys[s], ops.values[s]
                per_token = (math.prod(k.shape[2:]) + math.prod(v.shape[2:])) * k.shape[0] * k.element_size()
                tokens = max(1, min(budget, EXACT_STEP_BYTES) // max(1, RING_PIECE_FRACTION * per_token))
            spans.append(_pieces(lengths, tokens))
        return cls(comm, layout, ops, budget, spans)

    @property
    def nk(self) -> int:
        return self.ops.order - 1

    def split(self, tensors) -> tuple[torch.Tensor, list, list, torch.Tensor | None]:
        nk = self.nk
        rel = tensors[1 + 2 * nk] if len(tensors) > 1 + 2 * nk else None
        return tensors[0], list(tensors[1: 1 + nk]), list(tensors[1 + nk: 1 + 2 * nk]), rel

    def _ring(self, slot: int, own_k: torch.Tensor, own_v: torch.Tensor, grads, op: str):
        """Yield (source rank, span, k, v, acc) once per step and piece of this slot's ring; k,
        v and acc are None where this rank has no block at that step.

        K/V blocks travel rank -> rank + 1, the next transfer posted before the current block is
        yielded, so communication overlaps computation. With ``grads`` (the own shard's dK, dV),
        ``acc`` holds views of the block's gradient accumulators: they travel on with the block
        after the consumer added to them, and after the last rank that needs the block they go
        back to its owner, which writes them into ``grads``. Causal attention makes the ring a
        pipeline: a block only travels towards higher ranks (rank r gets the r blocks of lower
        ranks), and the last rank sends the accumulators home. Every rank takes every step, even
        with nothing to compute, so that nested rings stay in step.
        """
        comm = self.comm
        P, r = comm.world, comm.rank
        pipeline = self.ops.causal
        tag = 3 * slot  # kv, accumulators travelling on, accumulators going home
        lead, kfeat, vfeat = own_k.shape[0], tuple(own_k.shape[2:]), tuple(own_v.shape[2:])
        kshape = lambda L: (lead, L, *kfeat)  # noqa: E731
        vshape = lambda L: (lead, L, *vfeat)  # noqa: E731
        size = lambda L: math.prod(kshape(L)) + math.prod(vshape(L))  # noqa: E731
        for piece in self.spans[slot]:
            length = [b - a for a, b in piece]
            a, b = piece[r]
            cur = _pack(own_k[:, a:b], own_v[:, a:b]) if b > a else None
            acc = torch.zeros_like(cur) if grads is not None and cur is not None else None
            # the last rank that needs the own block, and at which step it is done with it
            last, t_home = ((r - 1) % P, P - 1) if not pipeline else (P - 1, P - 1 - r)
            for t in range(P):
                src, prev = (r - t) % P, (r - t - 1) % P
                moves = t + 1 < P and (not pipeline or (r + 1 < P and t <= r))
                arrives = t + 1 < P and (not pipeline or t + 1 <= r) and length[prev] > 0
                nxt = own_k.new_empty(size(length[prev])) if arrives else None
                reqs = comm.exchange([(cur, (r + 1) % P, tag)] if moves and cur is not None else [],
                                     [(nxt, (r - 1) % P, tag)] if arrives else [], op)
                k = v = views = None  # None: no block here this step, but nested rings must run
                if cur is not None:
                    k, v = _unpack(cur, kshape(length[src]), vshape(length[src]))
                    views = None if acc is None else _unpack(acc, kshape(length[src]), vshape(length[src]))
                yield src, piece[src], k, v, views
                nxt_acc = home = None
                if grads is not None:
                    sends, recvs = [], []
                    if acc is not None:
                        if moves:
                            sends.append((acc, (r + 1) % P, tag + 1))
                        elif src != r:
                            sends.append((acc, src, tag + 2))
                        else:  # the own block's route ended here
                            self._deliver(grads, acc, a, b, kshape, vshape)
                    if arrives:
                        nxt_acc = torch.empty_like(nxt)
                        recvs.append((nxt_acc, (r - 1) % P, tag + 1))
                    if b > a and t == t_home and last != r:
                        home = own_k.new_empty(size(b - a))
                        recvs.append((home, last, tag + 2))
                    reqs += comm.exchange(sends, recvs, "ring_grads")
                for req in reqs:
                    req.wait()
                if home is not None:
                    self._deliver(grads, home, a, b, kshape, vshape)
                cur, acc = nxt, nxt_acc

    @staticmethod
    def _deliver(grads, buf: torch.Tensor, a: int, b: int, kshape, vshape) -> None:
        dk, dv = _unpack(buf, kshape(b - a), vshape(b - a))
        grads[0][:, a:b] += dk
        grads[1][:, a:b] += dv

    def _visit(self, slot: int, chosen: list, keys, values, grads, leaf, op: str) -> None:
        """Every combination of one block per key slot, nested rings from slot 0 inwards."""
        if slot == self.nk:
            leaf(chosen)
            return
        for step in self._ring(slot, keys[slot], values[slot], None if grads is None else grads[slot], op):
            self._visit(slot + 1, chosen + [step], keys, values, grads, leaf, op)

    def _block(self, chosen: list) -> tuple[Operands | None, TileEngine | None]:
        """The operands and tile engine of one (query shard, key block per slot) pair, or None
        when a slot has no block at this step or causal attention sees none of its keys."""
        ops = self.ops
        if any(c[2] is None for c in chosen):
            return None, None
        offsets = tuple(self.layout.k_start(s, src) + span[0] for s, (src, span, _, _, _) in enumerate(chosen))
        if ops.causal and any(off > ops.q_offset + ops.n - 1 for off in offsets):
            return None, None
        block = replace(ops, keys=tuple(c[2] for c in chosen), values=tuple(c[3] for c in chosen),
                        ms=tuple(span[1] - span[0] for _, span, _, _, _ in chosen), k_offsets=offsets)
        return block, TileEngine(block, self.budget, rel_m=self.layout.ms[0])

    def forward(self, q, keys, values, rel) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's output rows and their global log-sum-exp."""
        acc = None

        def leaf(chosen):
            nonlocal acc
            block, engine = self._block(chosen)
            if block is not None:
                acc = _merge(acc, *stream_forward(engine, q, list(block.keys), list(block.values), rel))

        self._visit(0, [], keys, values, None, leaf, "ring")
        assert acc is not None  # the diagonal block is always visited
        return acc

    def backward(self, q, keys, values, rel, out, lse, d_out, key_grads: bool):
        """dq, dK, dV (and dW) of this rank's shards: each tile recomputed from the global lse."""
        delta, dq, dks, dvs, drel = backward_buffers(q, keys, values, rel, out, d_out)

        def leaf(chosen):
            block, engine = self._block(chosen)
            if block is None:
                return
            if key_grads:  # into the accumulators that travel with the blocks
                bk, bv = [c[4][0] for c in chosen], [c[4][1] for c in chosen]
            else:  # the tiles always produce dK/dV: give them scratch that never travels
                bk = [torch.zeros_like(k) for k in block.keys]
                bv = [torch.zeros_like(v) for v in block.values]
            stream_backward(engine, q, list(block.keys), list(block.values), rel, d_out, lse, delta, dq, bk, bv,
                            drel)

        grads = list(zip(dks, dvs)) if key_grads else None
        self._visit(0, [], keys, values, grads, leaf, "ring_backward")
        return dq, dks, dvs, drel


class _RingAttention(torch.autograd.Function):
    """Exact ring attention as one autograd node: the forward saves this rank's shards, its output
    and the global log-sum-exp (O(shard)); the backward runs the ring again (``_ExactRing.backward``)."""

    @staticmethod
    def forward(ctx, ring: _ExactRing, *tensors):
        q, keys, values, rel = ring.split(tensors)
        out, lse = ring.forward(q, keys, values, rel)
        ctx.ring = ring
        ctx.save_for_backward(*tensors, out, lse)
        return out

    @staticmethod
    @full_precision_backward
    def backward(ctx, d_out):
        ring = ctx.ring
        *tensors, out, lse = ctx.saved_tensors
        q, keys, values, rel = ring.split(tensors)
        nk = ring.nk
        # every rank has the same requires_grad flags (handshake), so all take the same branch
        key_grads = any(ctx.needs_input_grad[2: 2 + 2 * nk])
        dq, dks, dvs, drel = ring.backward(q, keys, values, rel, out, lse, d_out, key_grads)
        return (None, dq, *dks, *dvs, *([drel] if rel is not None else []))


def _exact(ops: Operands, comm: _Comm, layout: ShardLayout, budget: int) -> torch.Tensor:
    ring = _ExactRing.build(ops, comm, layout, budget)
    if ops.tracks_grad:
        return _RingAttention.apply(ring, *ops.tensors)
    return ring.forward(ops.q, list(ops.keys), list(ops.values), ops.rel)[0]


# --------------------------------------------------------------------------- public


def _guard_gradients(ops: Operands, backend: str, comm: _Comm) -> None:
    """The one-process gradient guard (``backward()`` raises an InputError for a gradient that
    overflowed) across ranks: once this rank's input gradients are computed, one all_reduce of a
    flag per rank tells every rank which ranks saw an overflow, and all of them raise. A rank that
    raised alone would leave the others waiting in the collective. Every rank tracks the same
    inputs (the handshake checks), so every rank registers the hook and reaches the all_reduce."""
    tensors = [t for t in ops.tensors if t.requires_grad]

    def check(grads) -> None:
        flags = torch.zeros(comm.world, dtype=torch.float64, device=ops.q.device)
        bad = [g for g in grads if gradient_overflows(g)]
        if bad:
            flags[comm.rank] = 1.0
        comm.all_reduce(flags, dist.ReduceOp.SUM, "gradient_check")
        if bool(flags.any()):
            ranks = [i for i, f in enumerate(flags.tolist()) if f]
            dtype = bad[0].dtype if bad else ops.dtype
            raise gradient_overflow_error(backend, dtype, f"a gradient on rank(s) {ranks} of {comm.world}")

    torch.autograd.graph.register_multi_grad_hook(tensors, check)


def _global_view(ops: Operands, layout: ShardLayout) -> Operands:
    """This rank's operands seen as the whole sequence: global sizes and positions, for planning
    and the gradient certificate (which read sizes and positions, never the shard's arrays)."""
    return replace(ops, n=layout.n, ms=layout.ms, q_offset=0, k_offsets=())


@with_call_signature()
def attention(q: Any, k: Any, v: Any, *, spec: str | Spec = "pairwise", group=None, return_info: bool = False,
              **options: Any):
    """Sequence-parallel ``ta.attention``: this rank's shard of the output, differentiable.

    Every rank of ``group`` (default: the whole world) calls this with its contiguous shard of
    positions of q, k and v, in rank order, and the same other arguments. The result equals the
    matching rows of ``ta.attention`` on the concatenated inputs (exactly for ``exact``, within
    the same certified ``error_bound`` for ``poly``), and so do the gradients: backward through it
    gives every rank the gradient of its shards. The backward is collective, so every rank must
    run it. ``return_info`` gives the AttentionInfo of the global plan (global n, flops of the
    whole call, the one-process output and gradient certificates).
    """
    comm = _communicator(group)
    meta, local, exc = _local_description(spec, q, k, v, options)
    # the handshake is collective, so a bad shard on one rank raises on every rank (no hang)
    metas = comm.all_gather_object(meta)
    if exc is not None:
        raise exc
    assert local is not None
    spec_obj, request, options, W = local
    layout = _check_shards(metas, request.causal)
    r = comm.rank
    request = replace(request, q_offset=layout.q_start(r))
    nk = spec_obj.order - 1
    if W is not None:  # validate the shard against a stand-in, then compute with the whole W
        options = {**options, "rel": _rel_stand_in(W, q, k, v, layout.q_start(r))}
    ops = prepare(spec_obj, q, k, v, request, options, k_offsets=tuple(layout.k_start(s, r) for s in range(nk)))
    if W is not None:
        ops = replace(ops, rel=W.to(device=ops.device, dtype=ops.dtype))
    # global statistics: every bound is a max over tokens, so the max over ranks is exact
    maxima = torch.tensor(operand_maxima(ops).flat(), dtype=torch.float64, device=ops.q.device)
    comm.all_reduce(maxima, dist.ReduceOp.MAX, "plan_maxima")
    maxima = OperandMaxima.from_flat(maxima.tolist(), sum(t.order for t in ops.spec.terms))
    whole = _global_view(ops, layout)
    plan = plan_for(whole, request, maxima=maxima)
    if ops.tracks_grad:
        _guard_gradients(ops, plan.backend, comm)
    # with grad: autograd records the local engines and the cross-rank autograd.Functions. Values
    # far from 1 run as values near 1 and are scaled back, as on one process; the divisors come
    # from the global maxima, so every rank divides by the same powers of two
    with contextlib.nullcontext() if ops.tracks_grad else torch.no_grad(), full_precision(ops.device):
        if plan.backend == "poly":
            out = planned_backward(on_unit_values(plan, ops, lambda unit: _poly(plan, unit, comm, layout)), ops)
        else:  # in float64 where float32 could overflow, as the exact backend does
            wide = ops.to(torch.float64 if plan.exact_dtype == "float64" else ops.dtype)
            out = on_unit_values(plan, wide, lambda unit: _exact(unit, comm, layout, request.memory_budget))
            out = out.to(ops.dtype)
    result = ops.restore(check_fits(out, plan, ops))
    if return_info:
        return result, AttentionInfo.from_plan(plan, certify_gradients(plan, whole, maxima))
    return result


def communication_bytes(
    backend: str,
    *,
    n: int,
    ranks: int,
    d: int,
    e: int,
    order: int = 2,
    rank: int | None = None,
    batch: int = 1,
    causal: bool = False,
    itemsize: int = 4,
    backward: bool = False,
) -> int:
    """Payload bytes the busiest rank receives in one call, the control messages (handshake, plan
    maxima, gradient check) excluded (see CommLog); with ``backward=True``, in the backward pass of
    that call.

    poly: the order-1 key statistics U_m^T [v_m | 1], ``rank`` x (e+1) per slot and batch entry,
    summed by one all_reduce (causal: all_gather, P-1 of them received); independent of n. The
    backward moves their gradients the same way: the same bytes.
    exact: K/V blocks of n/P tokens x (d+e) per batch entry; slot s's ring runs P^s times
    (nested rings), each receiving P-1 blocks, so the total is (P^(order-1) - 1) blocks. The
    backward passes the blocks again and their dK/dV accumulators P times per ring (P-1 hops on
    and one home): (P^(order-1) - 1) + P (P^(order-1) - 1) / (P - 1) blocks. Causal rings are
    pipelines and move at most that.

    >>> ta.distributed.communication_bytes("poly", n=65536, ranks=4, d=8, e=8, rank=1287)
    46332
    >>> ta.distributed.communication_bytes("exact", n=65536, ranks=4, d=8, e=8)
    3145728
    >>> ta.distributed.communication_bytes("exact", n=65536, ranks=4, d=8, e=8, backward=True)
    7340032
    """
    nk = order - 1
    if backend == "poly":
        if rank is None:
            raise InputError("communication_bytes('poly', ...) needs rank= (the feature rank r of the plan)")
        state = nk * batch * rank * (e + 1) * itemsize
        return state * ((ranks - 1) if causal else 1) if ranks > 1 else 0
    if backend == "exact":
        if ranks == 1:
            return 0
        block = batch * math.ceil(n / ranks) * (d + e) * itemsize
        blocks = ranks**nk - 1
        if backward:
            blocks += ranks * (ranks**nk - 1) // (ranks - 1)
        return blocks * block
    raise InputError(f"backend={backend!r} is not one of 'poly', 'exact'")
