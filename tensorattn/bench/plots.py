"""PNG plots (matplotlib, Agg backend). Each function writes one figure and returns its caption."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

COLORS = {"poly": "C0", "exact": "C1", "sdpa": "C2", "favor": "C3", "taylor2": "C4"}
MARKERS = {"poly": "o", "exact": "s", "sdpa": "^", "favor": "v", "taylor2": "D"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax_list, path: Path, legend: bool = True) -> None:
    for ax in ax_list:
        ax.grid(True, which="both", alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def crossover(ns, t_fast, t_slow) -> float | None:
    """Smallest n (log-log interpolated) from which ``t_fast`` < ``t_slow`` at every larger measured n."""
    pts = sorted((n, a, b) for n, a, b in zip(ns, t_fast, t_slow) if a and b)
    if not pts:
        return None
    if all(a < b for _, a, b in pts):
        return float(pts[0][0])
    for i in range(len(pts) - 1, -1, -1):
        n, a, b = pts[i]
        if a >= b:
            if i == len(pts) - 1:
                return None
            n2, a2, b2 = pts[i + 1]
            r1, r2 = math.log(b / a), math.log(b2 / a2)  # <= 0 and > 0
            f = -r1 / (r2 - r1)
            return float(math.exp(math.log(n) + f * (math.log(n2) - math.log(n))))
    return None  # pragma: no cover


def _series(rows, spec, backend, causal=False, d=8):
    pts = sorted((r["n"], r["median_s"], r["estimated"]) for r in rows
                 if r["spec"] == spec and r["backend"] == backend and r["causal"] == causal and r["d"] == d
                 and r["status"] == "ok" and r["B"] == 1.0)
    return pts


def time_vs_n(rows: list[dict], path: Path) -> str | None:
    specs = [s for s in ("pairwise", "triple") if any(r["spec"] == s and r["status"] == "ok" for r in rows)]
    if not specs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(specs), figsize=(6.2 * len(specs), 4.6), squeeze=False)
    notes = []
    for ax, spec in zip(axes[0], specs):
        rival = "sdpa" if spec == "pairwise" else "exact"
        for backend in COLORS:
            pts = _series(rows, spec, backend)
            if not pts:
                continue
            ns = [p[0] for p in pts]
            ts = [p[1] for p in pts]
            ax.plot(ns, ts, color=COLORS[backend], label=backend, marker=None)
            for n, t, est in pts:
                ax.plot([n], [t], MARKERS[backend], color=COLORS[backend],
                        markerfacecolor="none" if est else COLORS[backend])
        poly = dict((p[0], p[1]) for p in _series(rows, spec, "poly"))
        for j, rival in enumerate(("sdpa", "exact") if spec == "pairwise" else ("exact",)):
            other = dict((p[0], p[1]) for p in _series(rows, spec, rival))
            common = sorted(set(poly) & set(other))
            x = crossover(common, [poly[n] for n in common], [other[n] for n in common])
            if x is None:
                continue
            text = f"from n ≈ {x:,.0f}" if x > common[0] else f"at every measured n ≥ {common[0]:,}"
            ax.axvline(x, color=COLORS[rival], ls="--", lw=1)
            ax.annotate(f"poly < {rival}\n{text}", (x, 0.02 + 0.12 * j), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", fontsize=8, color=COLORS[rival])
            notes.append(f"{spec}: poly beats {rival} {text}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n (queries = keys)")
        ax.set_ylabel("median time per call (s)")
        ax.set_title(f"{spec}, d = 8, entries in [-1, 1], scale 1/d, tol 1e-3")
    _save(fig, axes[0], path)
    cross = "; ".join(notes) if notes else "no crossover within the measured range"
    return ("Time per call against n, log-log, one line per backend. Hollow markers are estimated from "
            f"a measured fraction of the query rows (quadratic backends at large n). Dashed lines: the "
            f"crossovers, in the rival's colour ({cross}).")


def poly_time_vs_n(rows: list[dict], path: Path) -> str | None:
    """The attention polynomials: time per call against n for exact and poly, one panel per spec,
    with the exact/poly ratio printed at each n."""
    specs = list(dict.fromkeys(r["spec"] for r in rows if r["status"] == "ok"))
    if not specs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(specs), figsize=(5.6 * len(specs), 4.4), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        d = next(r["d"] for r in rows if r["spec"] == spec)
        series = {}
        for backend in ("exact", "poly"):
            pts = _series(rows, spec, backend, d=d)
            series[backend] = {n: t for n, t, _ in pts}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" + MARKERS[backend], color=COLORS[backend],
                    label=backend)
        for n in sorted(set(series["exact"]) & set(series["poly"])):
            ax.annotate(f"{series['exact'][n] / series['poly'][n]:.3g}x", (n, series["poly"][n]),
                        xytext=(0, -12), textcoords="offset points", fontsize=7, ha="center", color=COLORS["poly"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n (queries = keys per slot)")
        ax.set_ylabel("median time per call (s)")
        ax.set_title(f"{spec}, d = {d}, entries in [-1, 1], scale 1/d, tol 1e-3", fontsize=9)
    _save(fig, axes[0], path)
    return ("Attention polynomials: time per call against n, log-log, for the structured exact backend (the "
            "Strassen triangle as blocked GEMMs, the tree by message passing) and poly; the labels are the "
            "exact/poly ratios at each n.")


def error_vs_rank(exp: dict, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    poly = [p for p in exp["points"] if p["method"] == "poly"]
    ax.plot([p["rank"] for p in poly], [p["max_error"] for p in poly], "o-", color=COLORS["poly"],
            label="poly (Chebyshev), measured")
    ax.plot([p["rank"] for p in poly], [p["error_bound"] for p in poly], "--", color=COLORS["poly"], alpha=0.6,
            label="poly, certified bound")
    favor = {}
    for p in exp["points"]:
        if p["method"] == "favor":
            favor.setdefault(p["rank"], []).append(p["max_error"])
    ranks = sorted(favor)
    med = [float(np.median(favor[r])) for r in ranks]
    ax.plot(ranks, med, "v-", color=COLORS["favor"], label=f"FAVOR+ (median of {len(favor[ranks[0]])} seeds)")
    ax.fill_between(ranks, [min(favor[r]) for r in ranks], [max(favor[r]) for r in ranks], color=COLORS["favor"],
                    alpha=0.15)
    for p in exp["points"]:
        if p["method"] == "taylor2":
            ax.plot([p["rank"]], [p["max_error"]], "D", color=COLORS["taylor2"], label="taylor2 (degree-2 Taylor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank r (features per token)")
    ax.set_ylabel("max |out - exact|")
    ax.set_title(f"pairwise, n = {exp['n']}, d = {exp['d']}, entries in [-1, 1], scale 1/d")
    _save(fig, [ax], path)
    note = ""
    t2 = [p for p in exp["points"] if p["method"] == "taylor2"]
    same = [p for p in poly if t2 and p["rank"] == t2[0]["rank"]]
    if t2 and same and t2[0]["max_error"] < same[0]["max_error"]:
        note = (" At rank C(d+2, 2) the Taylor kernel measures below degree-2 Chebyshev here: typical scores are "
                "far inside the certified radius β, where Taylor is exact to second order, while Chebyshev "
                "spreads its error evenly over [−β, β] and is the one that carries a certificate.")
    return ("Max error against rank at equal rank: poly of degree g has rank C(d+g, g); FAVOR+ uses that many "
            "positive orthogonal random features (band: min to max over seeds); taylor2 is the degree-2 "
            "Taylor kernel of linear-attention models (rank C(d+2, 2)). The dashed line is poly's certified "
            "bound." + note)


def phase_transition(plans: dict, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    for row, k in enumerate(("2", "3")):
        entry = plans[k]
        ax_deg, ax_flops = axes[row]
        first = entry["sizes"][0]["points"]
        Bs = [p["B"] for p in first]
        ax_deg.plot(Bs, [p["degree"] if p["degree"] is not None else np.nan for p in first], "o-", ms=3,
                    color="C0", label="degree needed")
        ax_rank = ax_deg.twinx()
        ax_rank.plot(Bs, [p["rank"] if p["rank"] is not None else np.nan for p in first], "-", color="C3",
                     label="rank needed")
        ax_rank.set_yscale("log")
        ax_rank.set_ylabel("rank C(d+g, g)", color="C3")
        for i, size in enumerate(entry["sizes"]):
            label = f"n = 2^{int(round(math.log2(size['n'])))}"
            for ax in (ax_deg, ax_flops):
                ax.axvline(size["tau"], color=f"C{i + 4}", ls="--", lw=1,
                           label=f"τ_{k}({label[4:]}) = {size['tau']:.2f}" if ax is ax_deg else None)
            ratio = [p["flops_exact"] / p["flops_poly"] if p["flops_poly"] else np.nan for p in size["points"]]
            ax_flops.plot([p["B"] for p in size["points"]], ratio, "-", color=f"C{i + 4}", label=label)
        lines = ax_deg.get_legend_handles_labels()
        extra = ax_rank.get_legend_handles_labels()
        ax_deg.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="upper left")
        ax_flops.axhline(1.0, color="black", lw=0.8)
        ax_flops.set_yscale("log")
        ax_deg.set_xlabel("entry bound B (entries in [-B, B], scale 1/d)")
        ax_deg.set_ylabel(f"degree for tol = {entry['tol']:g}")
        ax_deg.set_title(f"order k = {k} ({entry['spec']}, d = {entry['d']}): degree and rank needed")
        ax_flops.set_xlabel("entry bound B")
        ax_flops.set_ylabel("predicted flops exact / poly")
        ax_flops.set_title(f"order k = {k}: predicted speedup, τ_{k}(n) = (ln n)^(1/{k}) dashed")
        ax_deg.grid(True, alpha=0.3)
    _save(fig, axes[:, 1], path)
    return ("The phase transition from `ta.plan` (no data): left, the Chebyshev degree (blue) and rank (red, "
            "log scale) that certify tol = 1e-3 as the entry bound B grows (the worst-case score radius is "
            "β = B^k); right, the predicted exact/poly flop ratio per n. Dashed vertical lines: the "
            "thresholds τ_k(n) = (ln n)^(1/k) for k = 2 (√ln n) and k = 3 (∛ln n). Degree grows like "
            "β = B^k, so the rank needed explodes past B ≈ τ_k(n) while exact's cost stays n^k.")


def term_phase(plans: dict, path: Path) -> str:
    """Rank needed (largest over the terms) against the entry bound B, one line per n, with each
    term's threshold (ln n)^(1/k_t) as a dashed line in that n's color."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {1: ":", 2: "--", 3: "-.", 4: (0, (1, 3))}
    for c, size in enumerate(plans["sizes"]):
        color = f"C{c}"
        pts = [p for p in size["points"] if p["ranks"]]
        # the curves of different n nearly coincide (n enters the degree only through roundoff):
        # wider lines underneath keep each visible
        lw = 1.0 + 1.6 * (len(plans["sizes"]) - 1 - c)
        ax.plot([p["B"] for p in pts], [max(p["ranks"]) for p in pts], "-", color=color, lw=lw, alpha=0.8,
                label=f"n = 2^{int(round(math.log2(size['n'])))}")
        past = [p for p in pts if not p["passed"]]
        ax.plot([p["B"] for p in past], [max(p["ranks"]) for p in past], "o", mfc="none", ms=3, color=color)
        seen = set()
        for k, tau in zip(plans["orders"], size["taus"]):
            if (k, round(tau, 12)) in seen:
                continue
            seen.add((k, round(tau, 12)))
            terms = [t for t, kk in enumerate(plans["orders"]) if kk == k]
            which = "term " + ",".join(map(str, terms)) if len(plans["orders"]) > 1 else "threshold"
            ax.axvline(tau, color=color, ls=styles.get(k, "--"), lw=1,
                       label=f"{which}: (ln n)^(1/{k}) = {tau:.2f}" if c == 0 or len(plans["sizes"]) <= 3 else None)
    ax.set_yscale("log")
    ax.set_xlabel("entry bound B (max |entry| of q and the keys; scale 1/d)")
    ax.set_ylabel("rank per term (largest)")
    terms = " + ".join(plans["terms"])
    ax.set_title(f"{plans['spec']}: {terms}", fontsize=9)
    _save(fig, [ax], path)
    return (f"{plans['spec']} (d = {plans['d']}, tol = {plans['tol']:g}): the rank `ta.plan` needs, from sizes "
            "alone, against the entry bound B; dashed lines mark each term's threshold (ln n)^(1/k_t) and hollow "
            "markers the plans past it (where the SETH lower bound applies). The rank depends on B through "
            "each term's radius beta_t and on n only through roundoff, so the curves of different n nearly "
            "coincide; they end where no degree up to max_degree certifies tol.")


def fixed_degree(exp: dict, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for i, k in enumerate(sorted(exp)):
        e = exp[k]
        pts = [p for p in e["points"] if p["max_error"] is not None]  # None: refused, beta past certification
        ax.plot([p["ratio"] for p in pts], [max(p["max_error"], 1e-17) for p in pts], "o-", color=f"C{i}",
                label=f"k = {k} ({e['spec']}, n = {e['n']}, d = {e['d']}): degree {e['degree']}, rank "
                      f"{e['rank']:,}, measured")
        ax.plot([p["ratio"] for p in pts], [p["error_bound"] or np.nan for p in pts], "--", color=f"C{i}", alpha=0.6,
                label=f"k = {k}: certified bound")
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.axhline(1e-3, color="black", lw=0.8, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("B / τ_k(n)  (τ_k(n) = (ln n)^(1/k))")
    ax.set_ylabel("max |out - exact| / max|v|")
    ax.set_title("poly at a fixed degree as B crosses the threshold")
    _save(fig, [ax], path)
    return ("Measured error of poly at a fixed degree (the degree certified for tol = 1e-3 at B = τ_k(n)/2), "
            "float64 features, as the entry bound B crosses τ_k(n) (vertical line) for k = 2 and k = 3. "
            "Dashed: the certified bound at that degree (it stops where the certificate no longer holds; past "
            "the largest certifiable radius the planner refuses to run a polynomial and the point is left out). The "
            "horizontal line is tol = 1e-3. Past the threshold a fixed rank cannot follow e^s: the polynomial "
            "leaves its interval and the error grows to O(1) or worse.")


def needle(exp: dict, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for i, size in enumerate(exp["sizes"]):
        pts = size["points"]
        xs = [p["x"] for p in pts]
        ax.plot(xs, [p["mean_weight"] for p in pts], "-", color=f"C{i}", label=f"n = {size['n']:,}, d = {size['d']}")
        ax.fill_between(xs, [p["min_weight"] for p in pts], [p["max_weight"] for p in pts], color=f"C{i}",
                        alpha=0.12)
        ax.plot(xs, [p["predicted"] for p in pts], ":", color=f"C{i}")
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("B² / ln n")
    ax.set_ylabel("softmax weight on the planted key")
    ax.set_title("needle: queries are copies of planted ±B keys, d = 2 log2 n")
    _save(fig, [ax], path)
    halves = []
    for size in exp["sizes"]:
        x = _half_point([p["x"] for p in size["points"]], [p["mean_weight"] for p in size["points"]])
        if x is not None:
            halves.append(f"{x:.2f} at n = {size['n']:,}")
    where = ("; the mean weight reaches 1/2 at B²/ln n ≈ " + ", ".join(halves)) if halves else ""
    return ("The needle experiment: random ±B keys in d = 2·log2 n dimensions, each query a copy of one "
            "planted key, scale 1/d, so the planted score is B². Solid: mean softmax weight on the planted "
            "key over the queries (band: min to max); dotted: the annealed prediction "
            "1/(1 + (n-1)·cosh(B²/d)^d·e^(-B²)). The weight jumps from ≈0 to ≈1 around B² ≈ ln n (dashed "
            f"line){where}, and the jump sharpens as n grows: past the threshold attention becomes "
            "nearest-neighbour search.")


def _half_point(xs, ys) -> float | None:
    """First x where ys crosses 1/2 (linear interpolation)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y0 < 0.5 <= y1:
            return x0 + (0.5 - y0) * (x1 - x0) / (y1 - y0)
    return None
