"""Position maths for the positional specs: RoPE rotations and relative-position matrices W[i-j].

``rope`` is pairwise attention on rotated q and k (rotations keep l2 norms, so the score radius is
unchanged). ``relative`` scores are ``scale * q_i^T W[i - j + m - 1] k_j``, optionally minus an
ALiBi decay ``alibi_slope * |i - j|``. Positions include ``q_offset`` (queries) and the key
offsets of a sequence shard.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_choice, check_number
from .errors import InputError

ROPE_LAYOUTS = ("interleaved", "half")


def check_options(positional: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Validate the spec options of a positional kind; returns them with numbers as floats."""
    out = dict(options)
    if positional == "rope":
        out["rope_base"] = check_number("rope_base", options["rope_base"], low=0.0, low_open=True,
                                        hint="the RoPE frequency base (default 10000.0)")
        out["rope_layout"] = check_choice("rope_layout", options["rope_layout"], ROPE_LAYOUTS)
    elif positional == "relative" and options.get("alibi_slope") is not None:
        out["alibi_slope"] = check_number("alibi_slope", options["alibi_slope"], low=0.0,
                                          hint="the ALiBi bias is -alibi_slope * |i - j|")
    return out


def rope_angles(positions: torch.Tensor, d: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """theta_l = base^(-2l/d), angle = position * theta_l, shape (len(positions), d/2)."""
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float64, device=positions.device) * 2.0 / d)
    return (positions.to(torch.float64)[:, None] * inv[None, :]).to(dtype)


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float, layout: str) -> torch.Tensor:
    """Rotate ``x`` (Z, n, d) by RoPE angles. Interleaved pairs (2l, 2l+1); half pairs (l, l+d/2)."""
    d = x.shape[-1]
    ang = rope_angles(positions, d, base, x.dtype)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(x.shape)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def rotate(q: torch.Tensor, keys: list[torch.Tensor], q_pos: torch.Tensor, k_pos: list[torch.Tensor],
           options: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """RoPE: q and every key rotated by their positions."""
    d = q.shape[-1]
    if d % 2:
        raise InputError(f"rope needs an even head dim d to pair coordinates, but q has d={d}. Fix: use an even d")
    base, layout = options["rope_base"], options["rope_layout"]
    return rope_rotate(q, q_pos, base, layout), [rope_rotate(k, p, base, layout) for k, p in zip(keys, k_pos)]


def relative_length(n: int, m: int, q_offset: int) -> int:
    """Number of W matrices a call reads: q_offset + n + m - 1."""
    return q_offset + n + m - 1


def check_rel(W: torch.Tensor | None, n: int, m: int, d: int, q_offset: int) -> None:
    """W must be given, with shape (q_offset + n + m - 1, d, d)."""
    L = relative_length(n, m, q_offset)
    if W is None:
        raise InputError(
            f"spec 'relative' needs rel=W with shape ({L}, {d}, {d}) = (q_offset+n+m-1, d, d): "
            "W[i-j+m-1] is the matrix between query i and key j"
        )
    if tuple(W.shape) != (L, d, d):
        raise InputError(
            f"rel (W) has shape {tuple(W.shape)} but expected ({L}, {d}, {d}) = "
            f"(q_offset+n+m-1, d, d) for n={n}, m={m}, q_offset={q_offset}, d={d}"
        )


def relative_offsets(m: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Index into W for each (query, key) pair: i - j + m - 1 (positions include offsets)."""
    return q_pos[:, None] - k_pos[None, :] + (m - 1)


def alibi_bias(slope: float, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-slope * |i - j| for each (query, key) pair."""
    return -float(slope) * (q_pos[:, None] - k_pos[None, :]).abs().to(dtype)


def max_alibi_decay(slope: float, n: int, m: int, q_offset: int) -> float:
    """slope * (distance from the last query to the nearest key): the smallest weight factor."""
    return float(slope or 0.0) * max(0, q_offset + n - m)


__all__ = [
    "ROPE_LAYOUTS", "alibi_bias", "check_options", "check_rel", "max_alibi_decay", "relative_length",
    "relative_offsets", "rope_angles", "rope_rotate", "rotate",
]
