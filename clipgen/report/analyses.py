"""The report's "Mechanistic analyses" section over the report's own runs: does sharing between the test domain D
and the other domains, at each layer, track held-out-class accuracy ({D}-lso-ood)?

Per test domain and configuration (model and settings; runs of one configuration differ in recipe and seed):

1. Levels: each sharing measure (clipgen.analyze.measures) per layer and recipe at each run's last analysed
   epoch, mean [95% t-interval] over seeds, with its different-class floor; the untrained epoch-0 checkpoint
   (one per seed: runs that share a seed start from the same weights) and node Jaccard's chance level beside it.
2. Differences paired by seed (LOD − CG-high, pseudo − CG-high, CG-high − CG-low, LOD − natural-only).
3. Rank correlation across runs of each measure at each layer with {D}-lso-ood (clipgen.analyze.rankstats):
   permutation p within seeds, family-wise over layers, bootstrap-over-seeds interval, within-recipe rho; a
   figure of rho per layer and a scatter at the intermediate layer with the largest rho.
4. The bounds each measure is read with: integrated-gradient completeness, SAE code density, CKA's floor spread.

CSV files next to index.html: analysis_measures.csv (every value), analysis_paired.csv, analysis_correlation.csv.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipgen.analyze import plots, store
from clipgen.analyze.measures import MEASURES, WHOLE, collect, with_accuracy
from clipgen.analyze.rankstats import correlation_by_layer
from clipgen.recipes.naming import FIG2_KINDS, KIND_NAMES
from clipgen.report.sections import escape as _e, interval
from clipgen.stats import t_interval
from clipgen.files import atomic_write_text

# (A, B) paired by seed: A − B. The paper's mechanism predicts more sharing where D-lso-ood is higher.
MECH_COMPARISONS = (("lod", "cg_high"), ("cg_high_pseudo", "cg_high"), ("cg_high", "cg_low"),
                    ("lod", "natural_only"))
FAMILY = ["test_domain", "model_name", "settings"]
N_PERM, N_BOOT = 10000, 2000


def _range(measure: str) -> tuple[float, float]:
    return (-1.0, 1.0) if measure.startswith("cka") else (0.0, 1.0)


def _kinds(t: pd.DataFrame) -> list[str]:
    present = set(t["recipe_kind"])
    return [k for k in FIG2_KINDS if k in present] + sorted(present - set(FIG2_KINDS))


def _rows(t: pd.DataFrame) -> list[tuple[str, str]]:
    """(measure, layer) in table order: measures as listed, layers in forward order."""
    keys = t[["measure", "layer", "layer_index"]].drop_duplicates()
    order = {m: i for i, m in enumerate(MEASURES)}
    keys = keys.assign(_m=keys["measure"].map(lambda m: order.get(m, 99))).sort_values(["_m", "layer_index"])
    return [(r.measure, r.layer) for r in keys.itertuples()]


def split_epochs(t: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trained: each run's last analysed epoch when it is above 0; untrained: epoch 0, one row per distinct
    weights, so runs that share a seed and hence their initial weights count once)."""
    last = t.groupby("run")["epoch"].transform("max")
    trained = t[(t["epoch"] == last) & (t["epoch"] > 0)]
    untrained = t[t["epoch"] == 0].drop_duplicates(["weights_sha256", "measure", "layer"])
    return trained, untrained


def _ci(vals, measure: str) -> dict:
    return t_interval(np.asarray(vals, np.float64), *_range(measure))


def _cell(vals, measure: str, floor=None) -> str:
    s = _ci(vals, measure)
    if s["n"] == 0:
        return "–"
    out = interval(s["mean"], s["ci95_low"], s["ci95_high"], s["n"])
    f = [v for v in (floor if floor is not None else []) if math.isfinite(v)]
    return out + (f"<br><span class=muted>floor {np.mean(f):.3f}</span>" if f else "")


def levels_table(trained: pd.DataFrame, untrained: pd.DataFrame) -> str:
    kinds = _kinds(trained)
    head = "".join(f"<th>{_e(KIND_NAMES.get(k, k))}</th>" for k in kinds)
    body = []
    for measure, layer in _rows(pd.concat([trained, untrained])):
        sel = trained[(trained["measure"] == measure) & (trained["layer"] == layer)]
        tds = "".join(f"<td>{_cell(g['value'], measure, g['floor'])}</td>"
                      for g in (sel[sel["recipe_kind"] == k] for k in kinds))
        u = untrained[(untrained["measure"] == measure) & (untrained["layer"] == layer)]
        chance = sel["chance"].dropna()
        body.append(f"<tr><td class=l>{_e(MEASURES.get(measure, measure))}</td><td class=l>{_e(layer)}</td>{tds}"
                    f"<td>{_cell(u['value'], measure, u['floor'])}</td>"
                    f"<td>{f'{chance.mean():.3f}' if len(chance) else ''}</td></tr>")
    return ("<div class=scroll><table><tr><th class=l>measure (D vs other domains, C2)</th><th class=l>layer</th>"
            f"{head}<th>untrained (epoch 0)</th><th>chance</th></tr>" + "".join(body) + "</table></div>")


def paired(trained: pd.DataFrame) -> pd.DataFrame:
    """Per (comparison, measure, layer): differences A − B between runs of the same seed."""
    out = []
    base = trained[["recipe_kind", "seed", "measure", "layer", "value"]]
    for ka, kb in MECH_COMPARISONS:
        a, b = base[base["recipe_kind"] == ka], base[base["recipe_kind"] == kb]
        if a.empty or b.empty:
            continue
        m = a.merge(b, on=["seed", "measure", "layer"], suffixes=("_a", "_b"))
        for (measure, layer), g in m.groupby(["measure", "layer"], sort=False):
            g = g.sort_values("seed")
            diffs = (g["value_a"] - g["value_b"]).to_numpy(np.float64)
            lo, hi = _range(measure)
            out.append({"kind_a": ka, "kind_b": kb, "measure": measure, "layer": layer,
                        **t_interval(diffs, lo - hi, hi - lo), "n_better": int((diffs > 0).sum()),
                        "per_seed": " ".join(f"{s}:{d:+.3f}" for s, d in zip(g["seed"], diffs))})
    return pd.DataFrame(out)


def paired_table(pairs: pd.DataFrame, order: list[tuple[str, str]]) -> str:
    if pairs.empty:
        return "<p class=muted>No recipes to pair (a pair needs both recipes analysed at the same seed).</p>"
    comps = list(dict.fromkeys(zip(pairs["kind_a"], pairs["kind_b"])))
    head = "".join(f"<th>{_e(KIND_NAMES.get(a, a))} − {_e(KIND_NAMES.get(b, b))}</th>" for a, b in comps)
    cells = {(r.kind_a, r.kind_b, r.measure, r.layer): r for r in pairs.itertuples()}
    body = []
    for measure, layer in order:
        tds = []
        for a, b in comps:
            r = cells.get((a, b, measure, layer))
            tds.append("<td></td>" if r is None else
                       f"<td>{interval(r.mean, r.ci95_low, r.ci95_high, r.n, signed=True)}"
                       f"<br><span class=muted>{r.n_better} of {r.n} seeds &gt; 0</span></td>")
        body.append(f"<tr><td class=l>{_e(MEASURES.get(measure, measure))}</td><td class=l>{_e(layer)}</td>"
                    + "".join(tds) + "</tr>")
    return ("<div class=scroll><table><tr><th class=l>measure</th><th class=l>layer</th>"
            f"{head}</tr>" + "".join(body) + "</table></div>")


VARIANTS = {"value": "the measure", "above_floor": "the measure minus its different-class floor"}


def correlations(trained: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per variant (the value; the value above its floor), measure and layer: rank correlation across the trained
    runs with the accuracy (rankstats). Bonferroni over the measures on top of the family-wise p over layers
    (``p_all``), within each variant."""
    out = []
    trained = trained.assign(above_floor=trained["value"] - trained["floor"])
    for variant in VARIANTS:
        for measure in [m for m in MEASURES if m in set(trained["measure"])]:
            sel = trained[trained["measure"] == measure]
            wide = sel.pivot_table(index="run", columns="layer_index", values=variant, aggfunc="first",
                                   dropna=False)
            if wide.empty:
                continue
            facts = sel.drop_duplicates("run").set_index("run").loc[wide.index]
            names = sel.drop_duplicates("layer_index").set_index("layer_index")["layer"]
            stats = correlation_by_layer(wide.to_numpy(np.float64), facts["accuracy"].to_numpy(np.float64),
                                         facts["seed"].to_numpy(), facts["recipe_kind"].to_numpy(), N_PERM, N_BOOT,
                                         seed)
            out += [{"variant": variant, "measure": measure, "layer": names[li], "layer_index": int(li), **st}
                    for li, st in zip(wide.columns, stats)]
    res = pd.DataFrame(out)
    if not res.empty:
        n = res.groupby("variant")["measure"].transform("nunique")
        res["p_all"] = np.minimum(1.0, res["p_family"] * n)
    return res


def _p(v: float) -> str:
    return "–" if not math.isfinite(v) else (f"{v:.4f}" if v >= 1e-4 else "<1e-4")


def _r(v: float) -> str:
    return f"{v:+.3f}" if math.isfinite(v) else "–"


def correlation_table(corr: pd.DataFrame, what: str) -> str:
    body = []
    for r in corr.itertuples():
        ci = f"[{r.boot_low:+.2f}, {r.boot_high:+.2f}]" if math.isfinite(r.boot_low) else "–"
        body.append(f"<tr><td class=l>{_e(MEASURES.get(r.measure, r.measure))}</td><td class=l>{_e(r.layer)}</td>"
                    f"<td>{_r(r.rho)}</td><td>{ci}</td><td>{_p(r.p_perm)}</td><td>{_p(r.p_family)}</td>"
                    f"<td>{_p(r.p_all)}</td><td>{_r(r.rho_within_recipe)}</td>"
                    f"<td>{_r(r.rho_loo)} <span class=muted>{_e(KIND_NAMES.get(r.loo_recipe, r.loo_recipe))}</span>"
                    f"</td><td>{r.n}</td></tr>")
    return (f"<div class=scroll><table><tr><th class=l>measure</th><th class=l>layer</th><th>Spearman rho with "
            f"{_e(what)}</th><th>95% bootstrap over seeds</th><th>p (shuffle within seed)</th><th>p family-wise "
            "over layers</th><th>p over layers and measures</th><th>rho within recipe</th><th>rho without the "
            "recipe that weakens it most</th><th>runs</th></tr>"
            + "".join(body) + "</table></div>")


def _intermediate(corr: pd.DataFrame) -> pd.DataFrame:
    """Rows of per-layer measures at layers strictly between the first and the last layer."""
    per_layer = corr[corr["layer"] != WHOLE]
    if per_layer.empty:
        return per_layer
    lo, hi = per_layer["layer_index"].min(), per_layer["layer_index"].max()
    return per_layer[(per_layer["layer_index"] > lo) & (per_layer["layer_index"] < hi)
                     & (per_layer["measure"] != "sae")]


def figures(trained: pd.DataFrame, corr: pd.DataFrame, fig_dir: Path, tag: str, what: str) -> list[tuple[str, str]]:
    """The rho-per-layer figure and the scatter at the best intermediate layer: ``[(file, caption)]``."""
    out = []
    layers = list(trained.drop_duplicates("layer_index").sort_values("layer_index")["layer"])
    series = {}
    for measure, g in corr.groupby("measure", sort=False):
        pos = {r.layer: (r.rho, r.boot_low, r.boot_high) for r in g.itertuples()}
        series[MEASURES.get(measure, measure)] = [pos.get(n, (None, None, None)) for n in layers]
    name = f"mech_rho_by_layer_{tag}.png"
    plots.errorbar_lines(layers, series, fig_dir / name, f"Spearman rho with {what} across runs, per layer",
                         "rho (95% bootstrap over seeds)")
    out.append((name, f"Rank correlation of each sharing measure with {what} across runs, per layer (bars: 95% "
                      "bootstrap interval over seeds; whole circuit at the right)"))
    mid = _intermediate(corr).dropna(subset=["rho"])
    if not mid.empty:
        best = mid.sort_values(["rho", "layer_index"], ascending=[False, True]).iloc[0]
        sel = trained[(trained["measure"] == best["measure"]) & (trained["layer"] == best["layer"])]
        name = f"mech_scatter_{tag}.png"
        label = f"{MEASURES.get(best['measure'], best['measure'])} at {best['layer']}"
        plots.recipe_scatter(sel["value"].to_numpy(), sel["accuracy"].to_numpy(),
                             [KIND_NAMES.get(k, k) for k in sel["recipe_kind"]], list(sel["seed"]), fig_dir / name,
                             f"{label}: rho {best['rho']:+.2f}", label, what)
        out.append((name, f"{what} against {label}, one point per run (the intermediate layer with the largest rho, "
                          "chosen after looking: its family-wise p is in the table)"))
    return out


def _sae_density(run_dirs: list[Path], runs: set, epoch0: bool) -> tuple[list[float], int | None]:
    l0, top = [], None
    for run_dir in map(Path, run_dirs):
        epochs = store.analysed_epochs(run_dir)
        epochs = [e for e in epochs if e == 0] if epoch0 else [e for e in epochs if e > 0][-1:]
        sae = store.read_epoch(run_dir, epochs[0]).get("sae") if epochs else None
        if sae and sae.get("run") in runs and sae.get("test_active") and not sae.get("reused_from"):
            l0.append(sae["test_active"]["mean"])
            top = sae.get("top_active")
    return l0, top


def bounds(trained: pd.DataFrame, run_dirs: list[Path], all_runs: set) -> str:
    """What each measure is read with: IG completeness per layer, SAE density, CKA floor spread (trained runs)."""
    runs = set(trained["run"])
    gaps, n_classes = {}, set()
    for run_dir in map(Path, run_dirs):
        epochs = store.analysed_epochs(run_dir)
        res = store.read_epoch(run_dir, epochs[-1]) if epochs else {}
        if not res or next(iter(res.values())).get("run") not in runs:
            continue
        n_classes.add(len(((res.get("cka") or {}).get("subsets") or {}).get("heldout") or []))
        circ = res.get("circuits") or {}
        per_layer = (circ.get("completeness") or {}).get("per_layer", {})
        for layer in circ.get("layers", []):
            c = per_layer[layer]
            gaps.setdefault(layer, []).append((c["relative_gap"], c["mean_abs_gap"], c["max_abs_gap"]))
    l0, top = _sae_density(run_dirs, runs, epoch0=False)
    l0_untrained, _ = _sae_density(run_dirs, all_runs, epoch0=True)
    parts = []
    if gaps:
        rows = "".join(f"<tr><td class=l>{_e(n)}</td><td>{np.nanmean([_nan(g[0]) for g in v]):.3f}</td>"
                       f"<td>{np.mean([g[1] for g in v]):.3f}</td><td>{max(g[2] for g in v):.2f}</td></tr>"
                       for n, v in gaps.items())
        parts.append("<p class=muted>Integrated gradients: how far each layer's node attributions are from adding "
                     "up to M(x) − M(0) (completeness), over the trained runs. A relative gap of 0.1 means the "
                     "attributions miss a tenth of the logit change they share out. Kept nodes are the top "
                     "channels by |attribution|; benchmarks/analysis_timing.py --ig-steps measures how far they move "
                     "with more steps.</p><table><tr><th class=l>"
                     "layer</th><th>mean relative gap</th><th>mean |gap| (logits)</th><th>max |gap|</th></tr>"
                     f"{rows}</table>")
    if l0:
        untrained = f" At the untrained checkpoints: {np.mean(l0_untrained):.1f}" if l0_untrained else ""
        if l0_untrained and np.mean(l0_untrained) < 1:
            untrained += (" (most untrained test images activate no feature at all, so the SAE sharing at epoch 0 "
                          "says little beyond its floor)")
        untrained += "." if untrained else ""
        parts.append(f"<p class=muted>SAE: a test image activates {np.mean(l0):.1f} features on average (runs: "
                     f"{min(l0):.1f}–{max(l0):.1f}); each image contributes its top {top} to the histograms, so "
                     f"{'every active feature counts' if max(l0) <= (top or 0) else 'the top-N cut is binding'}."
                     f"{untrained}</p>")
    cka = trained[trained["measure"].str.startswith("cka")]
    if not cka.empty:
        n = "/".join(str(k) for k in sorted(n_classes)) or "the held-out"
        parts.append(f"<p class=muted>CKA uses the unbiased HSIC on {n} class means: for representations that "
                     "share nothing it scatters around 0, negative values included. The floor (classes mismatched "
                     "by every cyclic shift) is that scatter's centre for these runs; a same-class value is shared "
                     f"structure only where it clears the floor (floor over runs and layers: "
                     f"{cka['floor'].min():+.3f} to {cka['floor'].max():+.3f}).</p>")
    return "".join(parts)


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _listed(rows: pd.DataFrame) -> str:
    return "; ".join(f"{MEASURES.get(r.measure, r.measure)} at {r.layer} (rho {r.rho:+.2f}, p {_p(r.p_all)})"
                     for r in rows.itertuples()) or "none"


def reading(corr: pd.DataFrame, what: str) -> str:
    """The numbers that answer the claim, in words (computed, never tuned): per variant, where a measure's rank
    correlation with the accuracy is positive with p < 0.05 over layers and measures, and how many of those lie
    before the last layer."""
    corr = corr.dropna(subset=["rho"])
    if corr.empty:
        return "<p>Too few analysed runs for a rank correlation (it needs 3 or more with an accuracy).</p>"
    parts = []
    for variant, label in VARIANTS.items():
        c = corr[corr["variant"] == variant]
        if c.empty:
            continue
        sig = c[(c["rho"] > 0) & (c["p_all"] < 0.05)]
        neg = c[(c["rho"] < 0) & (c["p_all"] < 0.05)]
        best = c.sort_values("rho", ascending=False).iloc[0]
        parts.append(f"<li>{_e(label)}: {_e(_listed(sig))}; of those at an intermediate layer: "
                     f"{len(_intermediate(sig))}. Largest rho {best.rho:+.2f} "
                     f"({_e(MEASURES.get(best.measure, best.measure))} at {_e(best.layer)}; within recipes "
                     f"{_r(best.rho_within_recipe)}; without {_e(KIND_NAMES.get(best.loo_recipe, best.loo_recipe))} "
                     f"{_r(best.rho_loo)}). Negative correlations that survive: {_e(_listed(neg))}.</li>")
    return (f"<p><b>Reading.</b> Positive rank correlations with {_e(what)} that survive the within-seed "
            "permutation test corrected over layers and measures (p &lt; 0.05):</p><ul>" + "".join(parts) + "</ul>"
            "<p class=muted>Across runs the recipes differ most, so a correlation can come from the recipe "
            "differences alone; the within-recipe rho says whether a measure also tracks the accuracy among the "
            "seeds of one recipe.</p>")


def _family_section(t: pd.DataFrame, run_dirs: list[Path], fig_dir: Path, tag: str, seed: int) -> tuple[str, dict]:
    d = t["test_domain"].iloc[0]
    what = f"{d}-lso-ood"
    trained, untrained = split_epochs(t)
    epochs = ", ".join(str(e) for e in sorted(trained["epoch"].unique()))
    html_parts = [f"<p class=muted>{trained['run'].nunique()} trained runs at epoch {_e(epochs)}; untrained: "
                  f"{untrained['weights_sha256'].nunique()} distinct epoch-0 checkpoints. Cells: mean [95% "
                  "t-interval] (n seeds); floor: the same measure between different classes of the same domains "
                  "(mean).</p>", levels_table(trained, untrained)]
    pairs = paired(trained)
    html_parts += ["<h4>Differences paired by seed</h4>", paired_table(pairs, _rows(trained))]
    corr = correlations(trained[np.isfinite(trained["accuracy"].astype(float))], seed) if not trained.empty \
        else pd.DataFrame()
    if not corr.empty and corr["rho"].notna().any():
        figs = figures(trained, corr[corr["variant"] == "value"], fig_dir, tag, what)
        html_parts += [f"<h4>Does sharing track {_e(what)}?</h4>", reading(corr, what)]
        html_parts += [f"<p class=muted>Rank correlation of {_e(label)}:</p>"
                       + correlation_table(corr[corr["variant"] == variant], what)
                       for variant, label in VARIANTS.items()]
        html_parts += [f'<figure><img src="analysis/{_e(f)}" alt="{_e(c)}"><figcaption>{_e(c)}</figcaption>'
                       "</figure>" for f, c in figs]
    html_parts += ["<h4>Bounds</h4>", bounds(trained, run_dirs, set(t["run"]))]
    return "".join(html_parts), {"paired": pairs, "correlation": corr}


def report_section(run_dirs: list[Path], report_dir: Path, long: pd.DataFrame, seed: int = 0) -> str:
    """HTML fragment (``<h2>`` first) on the analyses of ``run_dirs`` (the report's own runs); "" when none has
    any. Writes the CSVs next to the page and the figures to ``report_dir/analysis/``."""
    table, legacy = collect(run_dirs)
    if table.empty and not legacy:
        return ""
    report_dir = Path(report_dir)
    for old in (report_dir / "analysis").glob("*.png"):  # this section owns the folder: no figure of gone data
        old.unlink()
    parts = ["<h2 id=analyses>Mechanistic analyses</h2><p class=muted>clipgen-analyze (protocol §7). Each "
             "measure is taken between the test domain D and each other domain on the held-out classes C2 and "
             "averaged over the other domains (clipgen/analyze/measures.py); values per run in "
             "<a href='analysis_measures.csv'>analysis_measures.csv</a>.</p>"]
    if legacy:
        parts.append(f"<p><b>{len(legacy)} runs hold analyses in the layout before per-epoch folders</b> "
                     f"({_e(', '.join(legacy[:5]))}{', ...' if len(legacy) > 5 else ''}); they are not shown: rerun "
                     "clipgen-analyze on them (it moves and recomputes them).</p>")
    table = with_accuracy(table, long)
    atomic_write_text(report_dir / "analysis_measures.csv", table.to_csv(index=False))
    extra = {"paired": [], "correlation": []}
    for i, (key, t) in enumerate(table.groupby(FAMILY, sort=True)):
        d, model, settings = key
        parts.append(f"<h3>test domain {_e(d)} · {_e(model)}{' · ' + _e(settings) if settings else ''}</h3>")
        html_part, res = _family_section(t, run_dirs, report_dir / "analysis", f"{d}_{i}", seed)
        parts.append(html_part)
        for name, frame in res.items():
            if not frame.empty:
                extra[name].append(frame.assign(**dict(zip(FAMILY, key))))
    for name, frames in extra.items():
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        atomic_write_text(report_dir / f"analysis_{name}.csv", frame.to_csv(index=False))
    return "\n".join(parts)
