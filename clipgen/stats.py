"""Seed statistics, shared by the report, the analyses and the diffing tool: Student-t intervals clipped to a
metric's range, and differences between recipes paired by seed.

Runs that differ only in their recipe and share a seed start from the same initial weights and see their data in
a seed-determined order, so their seed-to-seed noise is shared; an interval on the per-seed differences is much
narrower than two overlapping unpaired intervals at n = 3 and is the right test of "recipe A beats recipe B".
Every interval is clipped to the range its quantity can take (accuracies to [0, 1], differences of accuracies to
[-1, 1]) and is reported with its n; with n < 2 it is NaN, never zero width.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

# t_{0.975, df} for df = 1..30; larger df use a Cornish-Fisher expansion around the normal quantile (error < 1e-4),
# so the report needs no scipy.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)

# Comparisons shown beside Fig. 2 (better-by-design recipe first): the paper's directions (protocol §6: pseudo >
# CG-high > CG-low, LOD and CG-low > natural-only) and CG-high vs LOD; only those with runs on both sides appear.
PAIRED_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("cg_low", "natural_only"), ("cg_high", "cg_low"), ("cg_high", "natural_only"), ("lod", "natural_only"),
    ("cg_high", "lod"), ("cg_low_pseudo", "cg_low"), ("cg_high_pseudo", "cg_high"))
# The paper's four questions, one paired difference each, drawn for every test domain side by side (the report's
# "Across test domains"): does diversity give DG (LOD > natural-only), does it give CG (CG-high > CG-low), is CG
# weaker than DG (CG-high vs LOD: the paper finds it can be), and is seeing C2 in D what CG lacks (pseudo > CG-high).
DOMAIN_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("lod", "natural_only"), ("cg_high", "cg_low"), ("cg_high", "lod"), ("cg_high_pseudo", "cg_high"))
# Metric-name endings that are sample counts (unbounded above); every other metric is a share in [0, 1].
_COUNT_SUFFIXES = ("-n-ood", "-n-id", "-n")


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (NaN for df < 1)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def metric_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: [0, inf) for sample counts, [0, 1] for accuracies, F1 and shares."""
    return (0.0, math.inf) if str(metric).endswith(_COUNT_SUFFIXES) else (0.0, 1.0)


def t_interval(values: Iterable[float], lo: float = -math.inf, hi: float = math.inf) -> dict:
    """Mean, sample std (ddof=1), n and the 95% Student-t interval of the finite ``values``, the interval clipped
    to [lo, hi]. NaN values are left out of n; std and the interval are NaN below two values."""
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    n = int(vals.size)
    mean = float(vals.mean()) if n else float("nan")
    std = float(vals.std(ddof=1)) if n > 1 else float("nan")
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    low, high = mean - half, mean + half
    if n > 1:
        low, high = min(max(low, lo), hi), max(min(high, hi), lo)
    return {"mean": mean, "std": std, "n": n, "ci95_low": low, "ci95_high": high}


def separation(low: float, high: float, n: int) -> str:
    """How a 95% interval of a difference A - B reads: "A > B" (above 0), "A < B" (below 0), "not separated"
    (it contains 0) or "one pair" (no interval below two pairs)."""
    if n < 2 or not (math.isfinite(low) and math.isfinite(high)):
        return "one pair" if n == 1 else "no pairs"
    return "A > B" if low > 0 else "A < B" if high < 0 else "not separated"


def paired_differences(final: pd.DataFrame, metric: str, match_on: Sequence[str],
                       comparisons: Sequence[tuple[str, str]] = PAIRED_COMPARISONS) -> pd.DataFrame:
    """Per comparison (kind A, kind B) and every group of ``match_on`` columns (task, test domain, model, settings
    ...): the differences A - B of ``metric`` between runs that agree on ``match_on``, the epoch and the seed.

    ``final`` is the long table at each run's final epoch (columns recipe_kind, recipe_id, seed, epoch, metric,
    value and ``match_on``). Seeds present on one side only are left out (``unpaired`` counts them). Returns one
    row per (group, recipe A, recipe B): n pairs, mean difference, std, 95% t-interval clipped to the metric's
    width, the seeds, each seed's difference and how many are > 0 / < 0."""
    lo, hi = metric_range(metric)
    width = hi - lo
    cols = [*match_on, "kind_a", "recipe_a", "kind_b", "recipe_b", "metric", "n", "mean", "std", "ci95_low",
            "ci95_high", "n_better", "n_worse", "unpaired", "seeds", "per_seed"]
    rows = final[(final["metric"] == metric) & np.isfinite(final["value"].astype(float))]
    out = []
    if rows.empty:
        return pd.DataFrame(out, columns=cols)
    keep = [*match_on, "recipe_kind", "recipe_id", "epoch", "seed"]
    # One value per run: the same (recipe, seed, settings) evaluated twice would be the same run directory.
    rows = rows.groupby(keep, dropna=False, sort=True)["value"].mean().reset_index()
    for key, g in rows.groupby(list(match_on), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        by_recipe = {rk: grp for rk, grp in g.groupby(["recipe_kind", "recipe_id"], sort=True)}
        for kind_a, kind_b in comparisons:
            for (ka, ra), ga in by_recipe.items():
                if ka != kind_a:
                    continue
                for (kb, rb), gb in by_recipe.items():
                    if kb != kind_b:
                        continue
                    pair = ga.merge(gb, on=["epoch", "seed"], suffixes=("_a", "_b"))
                    pair = pair.sort_values("seed")
                    diffs = (pair["value_a"] - pair["value_b"]).to_numpy(dtype=np.float64)
                    stats = t_interval(diffs, -width, width)
                    seeds = [int(s) if float(s).is_integer() else s for s in pair["seed"]]
                    out.append({**dict(zip(match_on, key)), "kind_a": ka, "recipe_a": ra, "kind_b": kb,
                                "recipe_b": rb, "metric": metric, **stats, "n_better": int((diffs > 0).sum()),
                                "n_worse": int((diffs < 0).sum()),
                                "unpaired": len(set(ga["seed"]) ^ set(gb["seed"])),
                                "seeds": " ".join(str(s) for s in seeds),
                                "per_seed": " ".join(f"{s}:{d:+.3f}" for s, d in zip(seeds, diffs))})
    return pd.DataFrame(out, columns=cols)
