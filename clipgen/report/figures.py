"""The report's figures (PNG): the paper's Fig. 2 bars (per test domain, and across test domains with the paired
differences beside them), learning curves, Fig. 3 (accuracy vs number of extra
domains), Fig. 13 (accuracy vs allow-p) and the prediction concentration per run.

Figures are drawn on ``matplotlib.figure.Figure`` objects, which render with Agg without touching pyplot's
global state, so building a report never needs a display or changes the backend of a caller's session.
Every function returns the path it wrote, or None when there was nothing to draw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from clipgen.recipes.naming import FIG2_KINDS, KIND_NAMES
from clipgen.report.aggregate import CONFIG
from clipgen.report.domains import difference_label, domain_groups
from clipgen.stats import DOMAIN_COMPARISONS, metric_range, t_interval

# A fixed colour per recipe kind, shared by every figure.
# Axis labels: the kinds' names (clipgen.recipes.naming), the pseudo bounds on two lines.
KIND_LABELS = {k: v.replace(" pseudo", "\npseudo") for k, v in KIND_NAMES.items()}
KIND_COLORS = {"natural_only": "#7f7f7f", "cg_low": "#1f77b4", "cg_high": "#2ca02c", "lod": "#d62728",
               "cg_low_pseudo": "#aec7e8", "cg_high_pseudo": "#98df8a", "allow": "#9467bd",
               "interpolation": "#ff7f0e"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _labels(groups: list[tuple[str, str, str, str]]) -> list[str]:
    """The recipe kind's name, plus the recipe id where a kind has several, plus the model where there are
    several, plus the settings where runs of one recipe and model differ in them (recipe ids are long; the
    report's tables name them all)."""
    many_models = len({m for _, _, m, _ in groups}) > 1
    recipes = [(r, m) for _, r, m, _ in groups]
    out = []
    for kind, rid, model, settings in groups:
        text = KIND_LABELS.get(kind, kind)
        if len({r for k, r, _, _ in groups if k == kind}) > 1:
            text += f"\n{rid}"
        if many_models:
            text += f"\n{model}"
        if recipes.count((rid, model)) > 1:
            text += f"\n{settings or 'defaults'}"
        out.append(text)
    return out


def fig2_bars(final: pd.DataFrame, task: str, metric: str, chance: float, path: Path,
              title: str = "") -> Path | None:
    """Bars of ``metric`` at the final epoch per recipe (Fig. 2 order): height = mean over seeds, error bar =
    95% t-interval clipped to the metric's range, n seeds under each bar, one dot per seed, dashed line at
    chance."""
    rows = final[(final["task"] == task) & (final["metric"] == metric) & final["recipe_kind"].isin(FIG2_KINDS)]
    rows = rows[np.isfinite(rows["value"])]
    if rows.empty:
        return None
    order = {k: i for i, k in enumerate(FIG2_KINDS)}
    groups = sorted(rows.groupby(CONFIG), key=lambda kv: (order[kv[0][0]], *kv[0][1:]))
    fig = Figure(figsize=(max(4.0, 1.3 * len(groups) + 1.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same figure
    ns = []
    for x, ((kind, *_), g) in enumerate(groups):
        vals = g["value"].to_numpy(dtype=float)
        ci = t_interval(vals, *metric_range(metric))
        err = [[ci["mean"] - ci["ci95_low"]], [ci["ci95_high"] - ci["mean"]]] if ci["n"] > 1 else None
        ax.bar(x, ci["mean"], yerr=err, color=KIND_COLORS.get(kind, "#333333"), alpha=0.85, capsize=4,
               edgecolor="black", linewidth=0.6)
        ax.scatter(x + rng.uniform(-0.15, 0.15, vals.size), vals, color="black", s=14, zorder=3)
        ns.append(ci["n"])
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{label}\nn={n}" for label, n in zip(_labels([key for key, _ in groups]), ns)],
                       fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, max(1.0, float(rows["value"].max()) * 1.05))
    ax.set_title(title or f"{task}: {metric} at the final epoch (mean, 95% CI)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def learning_curves(agg: pd.DataFrame, task: str, metrics: list[str], chance: float, path: Path) -> Path | None:
    """One panel per metric: mean over seeds vs epoch per recipe, with a ±std band where there are 2+ seeds."""
    rows = agg[(agg["task"] == task) & agg["metric"].isin(metrics)]
    if rows.empty:
        return None
    fig = Figure(figsize=(5.0 * len(metrics), 3.8))
    order = {k: i for i, k in enumerate(KIND_LABELS)}
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        sub = rows[rows["metric"] == metric]
        groups = sorted(sub.groupby(CONFIG), key=lambda kv: (order.get(kv[0][0], 99), *kv[0][1:]))
        for label, ((kind, *_), g) in zip(_labels([key for key, _ in groups]), groups):
            g = g.sort_values("epoch")
            x, m, s = g["epoch"].to_numpy(), g["mean"].to_numpy(float), g["std"].to_numpy(float)
            color = KIND_COLORS.get(kind)
            ax.plot(x, m, marker="o", markersize=3, color=color, label=label.replace("\n", " "))
            if np.isfinite(s).any():
                lo, hi = metric_range(metric)  # a ±std band never leaves the metric's range
                ax.fill_between(x, np.clip(m - np.nan_to_num(s), lo, hi), np.clip(m + np.nan_to_num(s), lo, hi),
                                color=color, alpha=0.12, linewidth=0)
        ax.axhline(chance, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.set_title(metric, fontsize=9)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def fig3_extra_domains(final_runs: pd.DataFrame, metric: str, chance: float, path: Path) -> Path | None:
    """Accuracy vs number of extra domains (Fig. 3/8): one dot per run, the mean per count joined by a line.
    Drawn only when interpolation runs exist; CG-low (0 extra) and CG-high (4 extra) runs join as endpoints."""
    rows = final_runs[(final_runs["metric"] == metric) & final_runs["n_extra_domains"].notna()]
    if not (rows["recipe_kind"] == "interpolation").any():
        return None
    rows = rows[rows["recipe_kind"].isin(["interpolation", "cg_low", "cg_high"]) & np.isfinite(rows["value"])]
    if rows.empty:
        return None
    fig = Figure(figsize=(5.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    for kind, g in rows.groupby("recipe_kind"):
        x = g["n_extra_domains"].to_numpy(float)
        ax.scatter(x + rng.uniform(-0.08, 0.08, x.size), g["value"], s=18, color=KIND_COLORS.get(kind),
                   label=KIND_LABELS.get(kind, kind).replace("\n", " "), zorder=3)
    means = rows.groupby("n_extra_domains")["value"].mean().sort_index()
    ax.plot(means.index.to_numpy(float), means.to_numpy(float), color="black", linewidth=1.2, label="mean")
    ax.axhline(chance, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("number of extra domains (besides real and D)")
    ax.set_ylabel(metric)
    ticks = sorted(rows["n_extra_domains"].astype(int).unique())
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig13_allow(final_runs: pd.DataFrame, metric: str, chance: float, path: Path) -> Path | None:
    """Accuracy vs allow-p (Fig. 13), one line per base (CG low / CG high). p = 0 is the base recipe and p = 1
    its pseudo upper bound, drawn when those runs exist."""
    rows = final_runs[(final_runs["metric"] == metric) & np.isfinite(final_runs["value"])]
    allow = rows[(rows["recipe_kind"] == "allow") & rows["allow_p"].notna()]
    if allow.empty:
        return None
    fig = Figure(figsize=(5.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for base in sorted(allow["allow_base"].dropna().unique()) or [None]:
        pts = allow if base is None else allow[allow["allow_base"] == base]
        pts = pts.assign(p=pts["allow_p"].astype(float))
        if base is not None:
            ends = [rows[rows["recipe_kind"] == base].assign(p=0.0),
                    rows[rows["recipe_kind"] == f"{base}_pseudo"].assign(p=1.0)]
            pts = pd.concat([pts, *ends], ignore_index=True)
        color = KIND_COLORS.get(base or "allow")
        ax.scatter(pts["p"], pts["value"], s=16, color=color, zorder=3)
        means = pts.groupby("p")["value"].mean().sort_index()
        ax.plot(means.index.to_numpy(float), means.to_numpy(float), color=color, marker="o", markersize=3,
                label=f"base {KIND_LABELS.get(base, base)}" if base else "allow-p")
    ax.axhline(chance, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("allow-p (share of each held-out class of D kept)")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _save(fig, path)


def concentration(conc: pd.DataFrame, threshold: float, path: Path) -> Path | None:
    """Per run (Fig. 2 order, then seed): the share of the most-predicted class and the normalised entropy of
    its predictions on the test domain's images; runs flagged as collapse in red, the flag threshold dashed and
    the share of a balanced K-class prediction dotted."""
    if conc.empty:
        return None
    order = {k: i for i, k in enumerate(KIND_LABELS)}
    rows = conc.assign(_o=conc["recipe_kind"].map(lambda k: order.get(k, 99))).sort_values(
        ["_o", "recipe_id", "model_name", "seed"])
    labels = [f"{KIND_LABELS.get(k, k)} s{s}".replace("\n", " ") for k, s in zip(rows["recipe_kind"], rows["seed"])]
    y = np.arange(len(rows))
    fig = Figure(figsize=(8.0, 0.9 + 0.28 * len(rows)))
    colors = ["#d62728" if c else KIND_COLORS.get(k, "#333333")
              for c, k in zip(rows["collapse"], rows["recipe_kind"])]
    for i, (col, title) in enumerate((("top_share", "share of the most-predicted class"),
                                      ("norm_entropy", "entropy of predictions / log K"))):
        ax = fig.add_subplot(1, 2, i + 1)
        vals = rows[col].to_numpy(float)
        ax.barh(y, vals, color=colors, edgecolor="black", linewidth=0.4)
        ax.scatter(vals, y, color=colors, edgecolor="black", s=16, zorder=3)  # a zero stays visible
        ax.set_yticks(y)
        ax.set_yticklabels(labels if i == 0 else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        if i == 0:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"collapse ≥ {threshold:g}")
            k = int(rows["num_classes"].max())
            ax.axvline(1 / k, color="black", linestyle=":", linewidth=1, label=f"balanced (1/{k})")
            ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def _per_seed(text: str) -> np.ndarray:
    """The values of a ``per_seed`` cell ("0:0.120 1:+0.050")."""
    return np.array([float(x.split(":")[1]) for x in str(text).split()], dtype=float) if text else np.array([])


def fig2_domains(table: pd.DataFrame, chances: dict[str, float], path: Path) -> Path | None:
    """Fig. 2 across test domains, from clipgen.report.domains.domain_table: one row of panels per test domain
    (and model / settings, where several): left, {D}-lso-ood per recipe (mean, 95% CI, dots = seeds, dashed =
    chance); right, the paper's differences paired by seed (mean, 95% CI, dots = seeds; filled where the interval
    excludes 0, with the seeds where A > B out of the pairs). The difference panels share one x axis."""
    groups = [(key, g) for key, g in domain_groups(table) if (g["row"] == "recipe").any()]
    if not groups:
        return None
    several = len({(m, s) for (_, m, s), _ in groups}) > 1
    diffs = table[table["row"] == "difference"]
    # the same bar and row slots in every panel, so domains line up (a missing recipe leaves its slot empty)
    kinds = [k for k in FIG2_KINDS if (table.loc[table["row"] == "recipe", "kind_a"] == k).any()]
    comps = [c for c in DOMAIN_COMPARISONS if ((diffs["kind_a"] == c[0]) & (diffs["kind_b"] == c[1])).any()]
    spread = [abs(v) for r in diffs.to_dict("records") for v in
              [r["ci95_low"], r["ci95_high"], *_per_seed(r["per_seed"])] if np.isfinite(v)]
    xmax = min(1.0, max(0.05, *spread) * 1.1)  # at least +-0.05: all-zero differences still get an axis
    fig = Figure(figsize=(10.0, 2.3 * len(groups) + 0.4))
    grid = fig.add_gridspec(len(groups), 2, width_ratios=[1.25, 1.0], wspace=0.45, hspace=0.45)
    rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same figure
    for i, ((d, model, settings), g) in enumerate(groups):
        title = f"{d}" + (f" ({model}, {settings or 'defaults'})" if several else "")
        ax = fig.add_subplot(grid[i, 0])
        recs = {r["kind_a"]: r for r in g[g["row"] == "recipe"].to_dict("records")}
        for x, k in enumerate(kinds):
            if k not in recs:
                continue
            r, vals = recs[k], _per_seed(recs[k]["per_seed"])
            err = [[r["mean"] - r["ci95_low"]], [r["ci95_high"] - r["mean"]]] if r["n"] > 1 else None
            ax.bar(x, r["mean"], yerr=err, color=KIND_COLORS.get(k, "#333333"), alpha=0.85, capsize=3,
                   edgecolor="black", linewidth=0.6)
            ax.scatter(x + rng.uniform(-0.15, 0.15, vals.size), vals, color="black", s=8, zorder=3)
        if np.isfinite(chances.get(d, np.nan)):
            ax.axhline(chances[d], color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([f"{KIND_LABELS.get(k, k)}\nn={recs[k]['n'] if k in recs else 0}" for k in kinds],
                           fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{d}-lso-ood", fontsize=8)
        ax.set_title(f"{title}: held-out classes in {d}", fontsize=9)
        ax = fig.add_subplot(grid[i, 1])
        for y, (a, b) in enumerate(comps):
            hit = g[(g["row"] == "difference") & (g["kind_a"] == a) & (g["kind_b"] == b)]
            if hit.empty:
                continue
            r = hit.iloc[0]
            vals = _per_seed(r["per_seed"])
            ax.scatter(vals, y + rng.uniform(-0.12, 0.12, vals.size), color="#999999", s=8, zorder=2)
            color = KIND_COLORS.get(a, "#333333")
            if r["n"] > 1 and np.isfinite(r["ci95_low"]):
                ax.plot([r["ci95_low"], r["ci95_high"]], [y, y], color=color, linewidth=2.2, zorder=3)
            separated = r["verdict"] in ("A > B", "A < B")
            ax.scatter([r["mean"]], [y], s=42, zorder=4, edgecolor=color, linewidth=1.5,
                       color=color if separated else "white")
            ax.text(1.02, y, f"{int(r['n_better'])}/{int(r['n'])}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(comps)))
        ax.set_yticklabels([difference_label(a, b) for a, b in comps], fontsize=7)
        ax.set_ylim(len(comps) - 0.5, -0.5)
        ax.set_xlim(-xmax, xmax)
        ax.set_title(f"{title}: paired by seed (A − B)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if i == len(groups) - 1:
            ax.set_xlabel("difference of {D}-lso-ood, A − B", fontsize=8)
    return _save(fig, path)
