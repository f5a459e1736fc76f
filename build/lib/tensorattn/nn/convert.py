"""One-line model conversion: replace every ``torch.nn.MultiheadAttention`` of a model by a
``MultiheadTensorAttention`` with the same weights, and report, per layer, what the bound check
says on a sample batch (docs/torch.md#use-it-in-your-model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..registry import AUTO, get_backend, serving
from ..spec import Spec
from .modules import MultiheadTensorAttention


@dataclass(frozen=True)
class LayerReport:
    """One converted layer: where it is, its sizes, and the bound check on the sample batch.

    ``n``/``m`` (queries/keys), ``B``, ``threshold``, ``passed``, ``poly_bound`` are from the
    sample's call (None without a sample; the largest B when the layer ran several times).
    ``poly_ok`` says whether poly runs there with a certificate for ``tol``; ``poly_bound`` is that
    certificate's bound on max|out - exact|. ``backend`` is what the layer runs (for ``"auto"``:
    what the plan chose on the sample), ``error_bound`` its certified error on the sample (0.0 for
    exact, None for an uncertified baseline), ``reason`` why."""

    name: str
    embed_dim: int
    num_heads: int
    n: int | None
    m: int | None
    B: float | None
    threshold: float | None
    passed: bool | None
    poly_ok: bool | None
    poly_bound: float | None
    backend: str
    error_bound: float | None
    reason: str
    dropout: float = 0.0

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "not checked (no sample)"
        return "within bound" if self.passed else "past threshold"


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


@dataclass(frozen=True)
class ConversionReport:
    """The rows of ``convert``, one per converted layer; ``str()`` prints them as a table."""

    layers: tuple[LayerReport, ...]
    backend: str
    tol: float

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerReport:
        return self.layers[index]

    def __str__(self) -> str:
        head = ("layer", "E/heads", "n x m", "B", "tau", "verdict", "poly bound", "backend", "error bound", "why")
        rows = [head]
        for r in self.layers:
            size = "-" if r.n is None else f"{r.n} x {r.m}"
            rows.append((r.name, f"{r.embed_dim}/{r.num_heads}", size, _fmt(r.B, ".4f"), _fmt(r.threshold, ".4f"),
                         r.verdict, _fmt(r.poly_bound, ".2e"), r.backend, _fmt(r.error_bound, ".2e"), r.reason))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines) + f"\n(requested backend={self.backend!r}, tol={self.tol:g})"

    def __repr__(self) -> str:
        return f"ConversionReport(\n{self}\n)"


def _run(model: nn.Module, sample: Any) -> None:
    if isinstance(sample, dict):
        model(**sample)
    elif isinstance(sample, (tuple, list)):
        model(*sample)
    else:
        model(sample)


def _poly_ok(plan) -> tuple[bool, str]:
    """Whether poly serves this call with a certificate for tol, and if not, why."""
    serves = serving(get_backend("poly"), plan.spec, plan.problem)
    if not serves:
        return False, serves.reason
    if not plan.passed and plan.request.on_unbounded != "ignore":  # "ignore": poly past it, still certified
        return False, f"B = {plan.B:.3g} is past the threshold tau = {plan.threshold:.3g}"
    if plan.certificate is None:
        return False, f"no polynomial of degree <= max_degree certifies tol at beta = {plan.beta:.3g}"
    if plan.certificate.rank > plan.request.max_rank:
        return False, f"rank {plan.certificate.rank:,} exceeds max_rank"
    return True, "certified"


def convert(model: nn.Module, sample: Any = None, *, spec: str | Spec = "pairwise", backend: str = AUTO,
            tol: float = 1e-3, **options: Any) -> ConversionReport:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` (in place) by
    ``MultiheadTensorAttention.from_torch(..., spec=spec, backend=backend, tol=tol, **options)`` and
    return a ``ConversionReport`` with one row per layer.

    With a ``sample`` (the model's input: a tensor, a tuple of positional arguments or a dict of
    keyword arguments), the model runs once on it without gradient, and each row reports that
    layer's bound check: B against the threshold, whether poly is certified there and its error
    bound, and the backend the layer runs. ``backend="poly"`` sets poly where it is certified on
    the sample and exact elsewhere (the row says why); ``"auto"`` decides per call (the row shows
    the sample's choice); any other backend is set as given. ``torch.nn.TransformerEncoder``'s
    nested-tensor fast path, which calls torch's fused attention kernel directly, is turned off.

    >>> import torch, tensorattn as ta
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    >>> model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    >>> report = ta.nn.convert(model, torch.randn(2, 8, 16) * 0.1, backend="exact")
    >>> [row.name for row in report], type(model.layers[0].self_attn).__name__
    (['layers.0.self_attn', 'layers.1.self_attn'], 'MultiheadTensorAttention')
    """
    if isinstance(model, nn.MultiheadAttention):
        raise InputError("convert() replaces the attention layers inside a model; for a single "
                         "nn.MultiheadAttention use ta.nn.MultiheadTensorAttention.from_torch(mha)")
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    converted: list[tuple[str, MultiheadTensorAttention, float]] = []
    for name, mha in found:
        new = MultiheadTensorAttention.from_torch(mha, spec=spec, backend=backend, tol=tol, **options)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        converted.append((name, new, float(mha.dropout)))
    for mod in model.modules():
        if hasattr(mod, "use_nested_tensor"):  # torch.nn.TransformerEncoder: see the docstring
            mod.use_nested_tensor = False

    plans: dict[str, list] = {name: [] for name, _, _ in converted}
    if sample is not None and converted:
        saved = [(new, new.backend) for _, new, _ in converted]
        for name, new, _ in converted:
            new._recorded = plans[name]
            if new.backend == "poly":  # record what poly could do without raising past the threshold
                new.backend = AUTO
        try:
            with torch.no_grad():
                _run(model, sample)
        finally:
            for new, chosen in saved:
                new._recorded = None
                new.backend = chosen
    rows = []
    for name, new, dropout in converted:
        infos = plans[name]
        if not infos:
            why = "no sample given" if sample is None else "not called on the sample"
            rows.append(LayerReport(name, new.embed_dim, new.num_heads, None, None, None, None, None, None, None,
                                    new.backend, 0.0 if new.backend == "exact" else None, why, dropout))
            continue
        plan = max(infos, key=lambda info: info.B).plan
        ok, why = _poly_ok(plan)
        poly_bound = plan.certificate.output_error * plan.vmax if ok else None
        if backend == "poly":
            new.backend = "poly" if ok else "exact"
            runs, bound = new.backend, (poly_bound if ok else 0.0)
            reason = why if ok else f"poly refused on the sample: {why}"
        else:
            runs = plan.backend if backend == AUTO else backend
            bound = plan.error_bound if runs == plan.backend else (0.0 if runs == "exact" else None)
            reason = plan.reason if backend == AUTO else ("requested" + ("" if ok else f"; poly: {why}"))
        rows.append(LayerReport(name, new.embed_dim, new.num_heads, plan.n, max(plan.ms), plan.B, plan.threshold,
                                plan.passed, ok, poly_bound, runs, None if bound is None else float(bound), reason,
                                dropout))
    return ConversionReport(tuple(rows), backend, tol)


__all__ = ["ConversionReport", "LayerReport", "convert"]
