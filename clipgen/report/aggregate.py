"""Collect every run's ``eval/results.jsonl`` into a long table and aggregate it over seeds.

Long table: one row per (run, task, epoch, metric) with the run's recipe, test domain, seed and model. When a
checkpoint was evaluated twice (it was retrained, so its hash changed), the last line in the file wins.
Aggregates: mean, sample std (ddof=1), n and a 95% Student-t interval per (task, test domain, recipe, model,
settings, epoch, metric), so the seed is the only axis averaged over (``settings`` is the run name's settings part,
clipgen.rundir), the interval clipped to the metric's range; with a single seed the std and the interval are NaN,
not zero.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from clipgen import recipedir, rundir
from clipgen.errors import ClipgenError
from clipgen.rundir import read_results
from clipgen.stats import metric_range, t_interval

# A configuration: everything but the seed (clipgen.rundir: runs of one configuration differ only in their seed).
CONFIG = ["recipe_kind", "recipe_id", "model_name", "settings"]
GROUP = ["task", "test_domain", *CONFIG]


def _manifest(meta: dict, run_dir: Path) -> dict:
    path = meta.get("recipe_dir")
    if not path:
        return {}
    p = Path(path)
    p = p if p.is_absolute() else run_dir / p
    try:
        return recipedir.read_manifest(p)
    except ClipgenError:
        return {}  # the recipe may live on another machine; the run config is the fallback


def _run_config(run_dir: Path) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.load(rundir.config_path(run_dir)), resolve=False)
    except Exception:  # a missing or unreadable config only costs the Fig. 3/13 extras
        return {}


def recipe_extras(meta: dict, run_dir: Path) -> dict:
    """Values the Fig. 3 / Fig. 13 axes need: the number of extra domains (included domains - 2, from the
    recipe manifest, else the recipe of the run config) and the allow-p share with its base (cg_low: real + D;
    cg_high: all six domains)."""
    manifest, rcfg = _manifest(meta, run_dir), _run_config(run_dir).get("recipe", {}) or {}
    domains = manifest.get("domains")
    if domains is None and rcfg.get("kind"):
        try:  # the recipe's domain set follows from its config alone (clipgen.recipes.naming)
            from clipgen.recipes.naming import recipe_spec

            domains = list(recipe_spec(OmegaConf.create(rcfg)).domains)
        except (ClipgenError, KeyError, AttributeError, ValueError):
            domains = None
    extras = {"n_domains": len(domains) if domains else None,
              "n_extra_domains": len(domains) - 2 if domains else None, "allow_p": None, "allow_base": None}
    kind = meta.get("recipe_kind")
    if kind == "allow":
        spec = manifest.get("spec") or {}
        p = spec.get("allow_p", spec.get("heldout_keep"))
        if p is None:
            m = re.search(r"-allow([0-9.]+)", str(meta.get("recipe_id", "")))
            p = float(m.group(1)) if m else rcfg.get("allow_p")
        extras["allow_p"] = float(p) if p is not None else None
        base = spec.get("allow_base") or (manifest.get("config") or {}).get("allow_base") or rcfg.get("allow_base")
        if base is None and domains:
            base = "cg_high" if len(domains) == 6 else "cg_low"
        extras["allow_base"] = base
    return extras


def _joined(values) -> str:
    return " ".join(sorted({str(v) for v in values if v is not None}))


def collect(runs_root: Path, run_dirs: list[Path] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long table, runs table) of every ``{runs_root}/*/eval/results.jsonl`` (or of the given run directories);
    both empty when there is none."""
    rows, runs = [], []
    dirs = sorted(Path(runs_root).iterdir()) if run_dirs is None and Path(runs_root).is_dir() else run_dirs or []
    for run_dir in map(Path, dirs):
        results = rundir.results_path(run_dir)
        if not results.is_file():
            continue
        meta = rundir.load_meta(run_dir)  # every evaluated run keeps its meta.json: a clear error otherwise
        records, _ = read_results(results)  # a cut-off last line is ignored here; clipgen-eval repairs it
        latest: dict[tuple, dict] = {}
        for r in records:
            latest[(r.get("task"), int(r.get("epoch", -1)))] = r
        if not latest:
            continue
        extras = recipe_extras(meta, run_dir)
        base = {"run": meta.get("run_name", run_dir.name), "recipe_id": meta.get("recipe_id") or "",
                "recipe_kind": meta.get("recipe_kind") or "", "seed": meta.get("seed"),
                "model_name": meta.get("model_name") or "", "settings": rundir.settings_of(meta)}
        for (task, epoch), r in sorted(latest.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            head = {**base, "task": task, "test_domain": r.get("test_domain") or meta.get("test_domain"),
                    "epoch": epoch, "step": r.get("step"), "samples_seen": r.get("samples_seen")}
            for metric, value in r["metrics"].items():
                rows.append({**head, "metric": metric, "value": float(value)})
        recs = list(latest.values())
        runs.append({**base, "test_domain": meta.get("test_domain"), "run_dir": str(run_dir),
                     "tasks": _joined(r.get("task") for r in recs),
                     "epochs_evaluated": len({e for _, e in latest}), "last_epoch": max(e for _, e in latest),
                     "git_sha": _joined(r.get("git_sha") for r in recs),
                     "manifest_sha256": meta.get("manifest_sha256"),
                     "templates": _joined((r.get("eval_config") or {}).get("templates") for r in recs),
                     "num_classes": len(meta.get("classes") or []), **extras})
    long = pd.DataFrame(rows, columns=["run", "recipe_id", "recipe_kind", "seed", "model_name", "settings", "task",
                                       "test_domain", "epoch", "step", "samples_seen", "metric", "value"])
    return long, pd.DataFrame(runs)


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, n, 95% t-interval (clipped to the metric's range) and the seeds over runs, per group x epoch x
    metric (NaN values, i.e. empty groups, are left out of n)."""
    keys = GROUP + ["epoch", "metric"]
    out = []
    for key, g in long.groupby(keys, sort=True, dropna=False):
        stats = t_interval(g["value"].to_numpy(dtype=np.float64), *metric_range(key[-1]))
        seeds = " ".join(str(s) for s in sorted(g["seed"].dropna().unique()))
        out.append({**dict(zip(keys, key)), **stats, "seeds": seeds})
    return pd.DataFrame(out, columns=keys + ["mean", "std", "n", "ci95_low", "ci95_high", "seeds"])


def final_epochs(long: pd.DataFrame) -> pd.DataFrame:
    """The long-table rows at each group's final epoch (the largest epoch any of its seeds reached; a seed still
    training is then missing from the final numbers instead of mixing epochs)."""
    last = long.groupby(GROUP, dropna=False)["epoch"].transform("max")
    return long[long["epoch"] == last]
