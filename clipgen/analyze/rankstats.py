"""Does a sharing measure track held-out-class accuracy across runs? Rank correlation with the tests a study of
few seeds allows.

- rho: Spearman's rank correlation (average ranks for ties) between a measure and the accuracy over all runs.
- Permutation test that keeps the seed structure: within each seed the accuracies are shuffled among that seed's
  runs (recipes), never across seeds, so a seed that is good at everything cannot make a correlation. Two-sided
  p = (1 + #{|rho*| >= |rho|}) / (1 + permutations). The same permutations serve every layer of a measure, so the
  maximum |rho*| over layers gives family-wise p-values over layers (the best layer is picked after looking).
- Bootstrap over seeds: seeds drawn with replacement (all runs of a drawn seed together), rho recomputed; the 2.5
  and 97.5 percentiles. With 5 seeds this interval is coarse, and it says so by being wide.
- Within-recipe rho: Spearman of measure and accuracy after subtracting each recipe's mean from both: whether the
  measure tracks accuracy among runs of one recipe (seeds), not only the recipe differences.
- Leave one recipe out: rho without each recipe's runs in turn; the recipe whose removal weakens rho most and the
  rho without it (a correlation that is one recipe against the rest shows here).

Every random draw comes from ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of the finite pairs; NaN with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return _pearson_rows(rankdata(x[ok])[None, :], rankdata(y[ok])[None, :])[0]


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows of ``a`` and ``b`` ([k, n]); NaN for a constant row."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def within_seed_permutations(seeds: Sequence, n_perm: int, seed: int) -> np.ndarray:
    """``[n_perm, n]`` index arrays, each permuting positions only among runs of the same seed."""
    seeds = np.asarray(seeds)
    rng = np.random.default_rng(seed)
    out = np.tile(np.arange(len(seeds)), (n_perm, 1))
    for s in np.unique(seeds):
        pos = np.flatnonzero(seeds == s)
        if len(pos) > 1:
            out[:, pos] = pos[rng.permuted(np.tile(np.arange(len(pos)), (n_perm, 1)), axis=1)]
    return out


def correlation_by_layer(values: np.ndarray, acc: np.ndarray, seeds: Sequence, recipes: Sequence,
                         n_perm: int = 10000, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per column (layer) of ``values [runs, layers]``: rho, n, permutation p, family-wise p over the columns,
    bootstrap-over-seeds 95% interval, and the within-recipe rho (see the module docstring)."""
    values, acc = np.asarray(values, np.float64), np.asarray(acc, np.float64)
    seeds, recipes = np.asarray(seeds), np.asarray(recipes)
    perms = within_seed_permutations(seeds, n_perm, seed)
    null = np.full((n_perm, values.shape[1]), np.nan)
    out = []
    for j in range(values.shape[1]):
        ok = np.isfinite(values[:, j]) & np.isfinite(acc)
        rho = spearman(values[ok, j], acc[ok])
        if np.isfinite(rho):
            # a permuted accuracy that lands on a run without this layer's value drops out, as in rho itself
            permuted = acc[perms]
            keep = ok[None, :] & np.isfinite(permuted)
            null[:, j] = [spearman(values[k, j], permuted[i, k]) for i, k in enumerate(keep)] if not keep.all() \
                else _pearson_rows(np.tile(rankdata(values[:, j]), (n_perm, 1)), rankdata(permuted, axis=1))
        out.append({"rho": rho, "n": int(ok.sum()), **_boot(values[ok, j], acc[ok], seeds[ok], n_boot, seed),
                    "rho_within_recipe": _within(values[ok, j], acc[ok], recipes[ok]),
                    **_leave_one_recipe_out(values[ok, j], acc[ok], recipes[ok], rho)})
    for j, rec in enumerate(out):
        rho = rec["rho"]
        if not np.isfinite(rho):
            rec.update(p_perm=float("nan"), p_family=float("nan"))
            continue
        col, family = np.abs(null[:, j]), np.nanmax(np.abs(null), axis=1)
        rec["p_perm"] = float((1 + np.sum(col >= abs(rho) - 1e-12)) / (1 + n_perm))
        rec["p_family"] = float((1 + np.sum(family >= abs(rho) - 1e-12)) / (1 + n_perm))
    return out


def _boot(x: np.ndarray, y: np.ndarray, seeds: np.ndarray, n_boot: int, seed: int) -> dict:
    uniq = np.unique(seeds)
    if len(uniq) < 2 or len(x) < 3:
        return {"boot_low": float("nan"), "boot_high": float("nan"), "n_seeds": int(len(uniq))}
    rng = np.random.default_rng(seed + 1)
    members = [np.flatnonzero(seeds == s) for s in uniq]
    rhos = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])
        rhos.append(spearman(x[idx], y[idx]))
    rhos = np.asarray(rhos)
    rhos = rhos[np.isfinite(rhos)]
    if not rhos.size:
        return {"boot_low": float("nan"), "boot_high": float("nan"), "n_seeds": int(len(uniq))}
    return {"boot_low": float(np.percentile(rhos, 2.5)), "boot_high": float(np.percentile(rhos, 97.5)),
            "n_seeds": int(len(uniq))}


def _leave_one_recipe_out(x: np.ndarray, y: np.ndarray, recipes: np.ndarray, rho: float) -> dict:
    """rho without each recipe's runs in turn: is the correlation one recipe against the rest? ``loo_recipe`` is
    the recipe whose removal brings rho closest to 0 (or across it), ``rho_loo`` the rho without it."""
    best = {"rho_loo": float("nan"), "loo_recipe": None}
    for r in np.unique(recipes):
        keep = recipes != r
        if len(np.unique(recipes[keep])) < 2:
            continue
        v = spearman(x[keep], y[keep])
        if np.isfinite(v) and (best["loo_recipe"] is None or v * np.sign(rho) < best["rho_loo"] * np.sign(rho)):
            best = {"rho_loo": v, "loo_recipe": str(r)}
    return best


def _within(x: np.ndarray, y: np.ndarray, recipes: np.ndarray) -> float:
    xr, yr = x.copy(), y.copy()
    for r in np.unique(recipes):
        m = recipes == r
        xr[m] -= x[m].mean()
        yr[m] -= y[m].mean()
    return spearman(xr, yr)
