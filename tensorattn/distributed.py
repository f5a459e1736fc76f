"""Sequence-parallel attention on torch.distributed (docs/distributed.md).

Each rank of a process group holds a contiguous shard of positions of q, k and v (rank order is
position order) and gets back its shard of the output. Nothing here computes attention itself:
validation is ``inputs.prepare`` with the shard's global offsets, the plan is ``plan_for`` on the
global sizes and the all-reduced operand maxima (so every rank picks the same degree), and the
math runs in the existing engines:

* ``poly``: the factorized engine of backends/poly.py. Its per-slot key statistics
  S_m = U_m^T [v_m | 1] (r x (e+1)) are sums over key positions, so the global S_m is
  the sum of the ranks' partial sums: one all_reduce for non-causal attention. Causal attention adds
  the exclusive prefix of the other ranks' totals (an all_gather) to the local prefix states. The
  traffic is O(r e) per rank, independent of n.
* ``exact``: ring passing of K/V shards with the streaming tile engine of backends/exact.py on each
  (query shard, key block) pair and a log-sum-exp merge of the partial results, so no rank ever
  holds all keys. Causal attention turns the ring into a pipeline that never sends a block to a
  rank whose queries all precede it.

Importing this module initializes nothing; only ``attention`` talks to the process group.
"""

from __future__ import annotations

import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .api import AttentionInfo
from .backends.exact import TileEngine, stream_forward
from .backends.poly import polynomial_engine
from .errors import InputError
from .inputs import Operands, prepare
from .planning import OperandMaxima, operand_maxima, plan_for
from .request import Request, with_call_signature
from .spec import Spec, get_spec

#: backends that have a sequence-parallel implementation here
DISTRIBUTED_BACKENDS = ("auto", "exact", "poly")


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

    def exchange(self, send: torch.Tensor | None, dst: int, recv: torch.Tensor | None, src: int,
                 tag: int) -> list:
        """Post a send and/or a receive as one batch (safe on NCCL too); returns the requests."""
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.global_rank(dst), self.group, tag))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.global_rank(src), self.group, tag))
        if not ops:
            return []
        _record("ring", 0 if send is None else _nbytes(send), 0 if recv is None else _nbytes(recv))
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
    """What every rank must agree on; tensors are compared by shape only."""
    opts = tuple(sorted(
        (k, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v)) for k, v in options.items()
    ))
    return (
        ("spec", (spec.name, spec.score, spec.value, spec.positional)),
        *((f, repr(getattr(request, f))) for f in Request.names()), ("options", opts),
    )


def _local_description(spec_arg, q, k, v, call: dict[str, Any]
                       ) -> tuple[dict, tuple | None, BaseException | None]:
    """Validate this rank's shard alone; never raise, so that every rank reaches the handshake."""
    try:
        spec = get_spec(spec_arg)
        request, options = Request.from_call(spec, **call)
        if request.backend not in DISTRIBUTED_BACKENDS:
            raise InputError(
                f"backend={request.backend!r} has no sequence-parallel implementation; "
                f"ta.distributed.attention supports {', '.join(map(repr, DISTRIBUTED_BACKENDS))}"
            )
        if not spec.separable or spec.positional == "relative":
            raise InputError(
                f"spec {spec.name!r} (positional={spec.positional!r}) is not supported by "
                "ta.distributed.attention: its position matrices W[i-j] span every shard. Use 'rope' "
                "or a separable spec, or ta.attention on one process"
            )
        if request.q_offset is not None:
            raise InputError(
                f"q_offset={request.q_offset!r} cannot be passed to ta.distributed.attention: "
                "each rank's query offset is the global position of its shard (the sum of the "
                "shard lengths of lower ranks)"
            )
        ops = prepare(spec, q, k, v, replace(request, causal=False), options)
        if ops.tracks_grad or request.need_grad:
            raise InputError(
                "ta.distributed.attention computes the forward pass only (no backward across "
                "ranks yet), but an input requires grad. Fix: call it under torch.no_grad(), or "
                "train with ta.attention on one process"
            )
        meta = dict(
            error=None, signature=_call_signature(spec, request, options),
            lead=ops.lead, n=ops.n, ms=ops.ms, sizes=ops.sizes, value_sizes=ops.value_sizes,
            dtype=str(ops.dtype), device=ops.device.type,
        )
        return meta, (spec, request, options), None
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
    return ShardLayout(
        q_lengths=tuple(m["n"] for m in metas),
        k_lengths=tuple(tuple(m["ms"][s] for m in metas) for s in range(nk)),
    )


# --------------------------------------------------------------------------- poly


def _poly(plan, ops: Operands, comm: _Comm, layout: ShardLayout) -> torch.Tensor:
    """Factorized attention with the key statistics summed over ranks."""
    engine = polynomial_engine(plan, ops)
    nk = ops.order - 1
    states = [engine.key_state(s) for s in range(nk)]  # (Z, r, e_m + 1) each
    flat = torch.cat([s.reshape(-1) for s in states])
    split = lambda buf: [  # noqa: E731
        part.reshape(s.shape) for part, s in zip(buf.split([s.numel() for s in states]), states)
    ]
    if not ops.causal:
        # sum_m over all keys = sum over ranks of the shards' partial sums: one all_reduce
        total = comm.all_reduce(flat, dist.ReduceOp.SUM, "poly_states")
        out = engine.apply_queries(engine.combine(split(total)))
    else:
        # keys of lower ranks are all visible: start the prefix at their summed totals
        gathered = comm.all_gather(flat, "poly_prefix")
        initial = split(sum(gathered[: comm.rank], torch.zeros_like(flat)))
        out = engine.causal(initial=initial, key_offset=layout.k_start(0, comm.rank))
    return out.reshape(out.shape[0], ops.n, *ops.out_value_shape).to(ops.dtype)


# --------------------------------------------------------------------------- exact ring


def _pack(ops: Operands, slot: int) -> torch.Tensor:
    return torch.cat([ops.keys[slot].reshape(-1), ops.values[slot].reshape(-1)])


def _unpack(ops: Operands, slot: int, buf: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = ops.keys[slot], ops.values[slot]
    kshape = (k.shape[0], length, *k.shape[2:])
    vshape = (v.shape[0], length, *v.shape[2:])
    kn = math.prod(kshape)
    return buf[:kn].reshape(kshape), buf[kn:].reshape(vshape)


def _ring(comm: _Comm, own: torch.Tensor, sizes: list[int], tag: int, pipeline: bool):
    """Yield (source rank, block) once per step as K/V blocks travel rank -> rank + 1.

    The next transfer is posted before the current block is yielded, so communication overlaps
    the computation on it. With ``pipeline`` (causal) a block only travels towards higher ranks:
    rank r receives just the r blocks of the ranks before it, and the block is None at the steps
    after that (the step still happens, since nested rings below it must keep forwarding).
    """
    P, r = comm.world, comm.rank
    cur: torch.Tensor | None = own
    for t in range(P):
        src = (r - t) % P
        nxt, reqs = None, []
        if t + 1 < P:
            send = (r + 1 < P and t <= r) if pipeline else True
            recv = (t + 1 <= r) if pipeline else True
            if recv:
                nxt = own.new_empty(sizes[(r - t - 1) % P])
            reqs = comm.exchange(cur if send else None, (r + 1) % P, nxt, (r - 1) % P, tag)
        yield src, cur
        for req in reqs:
            req.wait()
        cur = nxt


def _merge(acc, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Log-sum-exp merge of two partial softmax results over disjoint key sets."""
    extra = (1,) * (out_b.ndim - 2)
    # a row that saw no key in a block has lse -inf and out 0/0: give it weight 0 and value 0
    out_b = torch.where(torch.isfinite(lse_b).reshape(*lse_b.shape, *extra), out_b, 0.0)
    if acc is None:
        return out_b, lse_b
    out_a, lse_a = acc
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe).reshape(*lse.shape, *extra)
    wb = torch.exp(lse_b - safe).reshape(*lse.shape, *extra)
    return out_a * wa + out_b * wb, lse


def _exact_ring(ops: Operands, comm: _Comm, layout: ShardLayout, budget_bytes: int) -> torch.Tensor:
    """Ring attention: each key slot's blocks circulate (nested rings for order > 2)."""
    nk = ops.order - 1
    q_last = ops.q_offset + ops.n - 1
    acc = None
    sizes = []
    for s in range(nk):
        per_token = (ops.keys[s][0, 0].numel() + ops.values[s][0, 0].numel()) * ops.q.shape[0]
        sizes.append([per_token * length for length in layout.k_lengths[s]])

    def visit(slot: int, chosen: list) -> None:
        nonlocal acc
        if slot == nk:
            if any(k is None for _, k, _ in chosen):
                return  # a causal pipeline step with no block here
            srcs = [src for src, _, _ in chosen]
            offsets = tuple(layout.k_start(s, src) for s, src in enumerate(srcs))
            if ops.causal and any(off > q_last for off in offsets):
                return  # every key of this block is in the future of every local query
            block = replace(
                ops, keys=tuple(k for _, k, _ in chosen), values=tuple(v for _, _, v in chosen),
                ms=tuple(layout.k_lengths[s][src] for s, src in enumerate(srcs)), k_offsets=offsets,
            )
            out_b, lse_b = stream_forward(TileEngine(block, budget_bytes), ops.q, list(block.keys),
                                          list(block.values), None)
            acc = _merge(acc, out_b, lse_b)
            return
        for src, buf in _ring(comm, _pack(ops, slot), sizes[slot], tag=slot, pipeline=ops.causal):
            k, v = (None, None) if buf is None else _unpack(ops, slot, buf, layout.k_lengths[slot][src])
            visit(slot + 1, chosen + [(src, k, v)])

    visit(0, [])
    assert acc is not None  # the diagonal block is always visited
    return acc[0]


# --------------------------------------------------------------------------- public


@with_call_signature()
def attention(q: Any, k: Any, v: Any, *, spec: str | Spec = "pairwise", group=None, return_info: bool = False,
              **options: Any):
    """Sequence-parallel ``ta.attention``: this rank's shard of the output.

    Every rank of ``group`` (default: the whole world) calls this with its contiguous shard of
    positions of q, k and v, in rank order, and the same other arguments. The result equals the
    matching rows of ``ta.attention`` on the concatenated inputs (exactly for ``exact``, within
    the same certified ``error_bound`` for ``poly``). ``return_info`` gives the AttentionInfo of the
    global plan (global n, flops of the whole call). Forward only: inputs must not require grad.
    """
    comm = _communicator(group)
    meta, local, exc = _local_description(spec, q, k, v, options)
    # the handshake is collective, so a bad shard on one rank raises on every rank (no hang)
    metas = comm.all_gather_object(meta)
    if exc is not None:
        raise exc
    assert local is not None
    spec_obj, request, options = local
    layout = _check_shards(metas, request.causal)
    r = comm.rank
    request = replace(request, q_offset=layout.q_start(r))
    nk = spec_obj.order - 1
    ops = prepare(spec_obj, q, k, v, request, options, k_offsets=tuple(layout.k_start(s, r) for s in range(nk)))
    # global statistics: every bound is a max over tokens, so the max over ranks is exact
    maxima = torch.tensor(operand_maxima(ops).flat(), dtype=torch.float64, device=ops.q.device)
    comm.all_reduce(maxima, dist.ReduceOp.MAX, "plan_maxima")
    plan = plan_for(ops, request, maxima=OperandMaxima.from_flat(maxima.tolist(), ops.order), n=layout.n,
                    ms=layout.ms)
    with torch.no_grad():
        if plan.backend == "poly":
            out = _poly(plan, ops, comm, layout)
        else:  # in float64 where float32 could overflow, as the exact backend does
            wide = ops.to(torch.float64 if plan.exact_dtype == "float64" else ops.dtype)
            out = _exact_ring(wide, comm, layout, request.memory_budget).to(ops.dtype)
    result = ops.restore(out)
    if return_info:
        return result, AttentionInfo.from_plan(plan)
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
) -> int:
    """Payload bytes the busiest rank receives in one call, handshake excluded (see CommLog).

    poly: the order-1 key statistics U_m^T [v_m | 1], ``rank`` x (e+1) per slot and batch entry,
    summed by one all_reduce (causal: all_gather, P-1 of them received); independent of n.
    exact: K/V blocks of n/P tokens x (d+e) per batch entry; slot s's ring runs P^s times
    (nested rings), each receiving P-1 blocks, so the total is (P^(order-1) - 1) blocks.

    >>> ta.distributed.communication_bytes("poly", n=65536, ranks=4, d=8, e=8, rank=1287)
    46332
    >>> ta.distributed.communication_bytes("exact", n=65536, ranks=4, d=8, e=8)
    3145728
    """
    nk = order - 1
    if backend == "poly":
        if rank is None:
            raise InputError("communication_bytes('poly', ...) needs rank= (the feature rank r of the plan)")
        state = nk * batch * rank * (e + 1) * itemsize
        return state * ((ranks - 1) if causal else 1) if ranks > 1 else 0
    if backend == "exact":
        block = batch * math.ceil(n / ranks) * (d + e) * itemsize
        return (ranks**nk - 1) * block
    raise InputError(f"backend={backend!r} is not one of 'poly', 'exact'")
