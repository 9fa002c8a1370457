"""The report's "Mechanistic analyses" section: every run's ``analysis/*.json`` under ``root/runs``, aggregated over
seeds per (test domain, recipe, model), as tables and figures (written under ``report_dir/analysis``).

Headline numbers per recipe, all between the test domain D and the other domains:
- SAE feature-sharing score of D (mean off-diagonal of D's row), over C2 and over the other classes;
- linear CKA of D vs real at the last layer, over C2 and over all classes;
- class-conditional L2 distance of D's and real's class means (C2);
- Jaccard of kept nodes / circuits of D vs real at the last layer (circuit classes).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from clipgen.analyze import plots
from clipgen.facts import DOMAINS, NATURAL_DOMAIN
from clipgen.recipes.naming import KIND_NAMES
from clipgen.rundir import settings_part

_NAMES = ("sae", "geometry", "cka", "circuits")


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(root: Path) -> list[dict]:
    """One record per run with analysis results: ``{"run", "recipe_id", "recipe_kind", "seed", "test_domain",
    "model_name", "epoch", <analysis name>: result}``."""
    out = []
    for adir in sorted(Path(root).glob("runs/*/analysis")):
        res = {n: _load(adir / f"{n}.json") for n in _NAMES}
        res = {n: r for n, r in res.items() if isinstance(r, dict) and "test_domain" in r}
        if not res:
            continue
        first = next(iter(res.values()))
        rec = {k: first.get(k) for k in ("run", "recipe_id", "recipe_kind", "seed", "test_domain", "model_name",
                                          "epoch")}
        rec.update(res)
        out.append(rec)
    return out


def _at(m, a: str, b: str):
    try:
        v = m[DOMAINS.index(a)][DOMAINS.index(b)]
    except (TypeError, IndexError, ValueError, KeyError):
        return None
    return None if v is None else float(v)


def _metrics(rec: dict) -> dict[str, float | None]:
    d = rec["test_domain"]
    out: dict[str, float | None] = {}
    sae = rec.get("sae") or {}
    subs = sae.get("subsets", {})
    out["SAE sharing of D, C2"] = subs.get("heldout", {}).get("test_domain_score")
    out["SAE sharing of D, other"] = subs.get("other", {}).get("test_domain_score")
    cka = rec.get("cka") or {}
    if cka.get("layers"):
        last = cka["layers"][-1]
        lin = cka.get("cka", {}).get("linear", {})
        out["CKA lin D–real, C2 (last layer)"] = _at(lin.get("heldout", {}).get(last), d, NATURAL_DOMAIN)
        out["CKA lin D–real, all (last layer)"] = _at(lin.get("all", {}).get(last), d, NATURAL_DOMAIN)
    geo = rec.get("geometry") or {}
    out["class-cond. dist. D–real, C2"] = _at(geo.get("class_conditional_distance", {}).get("heldout"), d,
                                              NATURAL_DOMAIN)
    out["domain-mean dist. D–real"] = _at(geo.get("domain_mean_distance"), d, NATURAL_DOMAIN)
    circ = rec.get("circuits") or {}
    if circ.get("layers"):
        last = circ["layers"][-1]
        out["node Jaccard D–real (last layer)"] = _at(circ.get("node_jaccard", {}).get(last), d, NATURAL_DOMAIN)
        out["circuit Jaccard D–real (last layer)"] = _at(circ.get("circuit_jaccard", {}).get(last), d,
                                                         NATURAL_DOMAIN)
    return out


def _mean_std(vals: list) -> tuple[float, float, int]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")), len(v)


def _cell(vals: list) -> str:
    m, s, n = _mean_std(vals)
    if n == 0:
        return "–"
    spread = f" ± {s:.3f}" if math.isfinite(s) else ""
    return f"{m:.3f}{spread} <span class=muted>({n})</span>"


def _per_layer(records: list[dict], analysis: str, field: str, subset: str | None, d: str):
    """(layers, mean D–real value per layer over the records' seeds) for CKA (field=kernel) or circuits."""
    layers, rows = None, []
    for r in records:
        res = r.get(analysis) or {}
        lay = res.get("layers")
        if not lay:
            continue
        if analysis == "cka":
            by_layer = res.get("cka", {}).get(field, {}).get(subset, {})
        else:
            by_layer = res.get(field, {})
            lay = [n for n in lay if n in by_layer]
        if layers is None:
            layers = lay
        if lay != layers:
            continue  # another architecture: not on the same axis
        rows.append([_at(by_layer.get(n), d, NATURAL_DOMAIN) for n in layers])
    if not rows:
        return None, None
    arr = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    with np.errstate(all="ignore"):
        mean = np.nanmean(arr, axis=0) if arr.size else arr
    return layers, [None if not np.isfinite(v) else float(v) for v in mean]


def _kind_order(key: tuple) -> tuple:
    """Columns in the report's recipe order (natural only, CG low, CG high, LOD, ...), then recipe id."""
    order = {k: i for i, k in enumerate(KIND_NAMES)}
    return (order.get(key[0], len(order)), *key[1:])


def _kind_label(kind: str) -> str:
    return KIND_NAMES.get(kind, kind)


def _figure(rel: str, caption: str) -> str:
    return (f'<figure><img src="{_e(rel)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


def report_section(root: Path, report_dir: Path) -> str:
    """HTML fragment (``<h2>`` first) with the analyses of every run under ``root/runs``; "" when there are none.
    Figures go to ``report_dir/analysis/`` and are linked relatively."""
    records = collect(Path(root))
    if not records:
        return ""
    fig_dir = Path(report_dir) / "analysis"
    parts = ["<h2>Mechanistic analyses</h2>",
             "<p class=muted>clipgen-analyze (protocol §7) at each run's analysed epoch; D = the test domain. Cells: "
             "mean ± std over seeds (n runs). SAE sharing: mean overlap of D's most frequent SAE features with the "
             "other domains'; CKA: linear CKA of per-class mean activations; Jaccard: kept nodes / circuits of the "
             "same class in D and real.</p>"]
    for d in [x for x in DOMAINS if any(r["test_domain"] == x for r in records)]:
        recs = [r for r in records if r["test_domain"] == d]
        groups: dict[tuple, list[dict]] = {}
        for r in recs:
            # one column per configuration: runs that differ only in their seed (clipgen.rundir)
            groups.setdefault((r.get("recipe_kind") or "", r.get("recipe_id") or "", r.get("model_name") or "",
                               settings_part(str(r.get("run") or ""))), []).append(r)
        keys = sorted(groups, key=_kind_order)
        metric_names = list(dict.fromkeys(k for r in recs for k in _metrics(r)))
        head = "".join(f"<th>{_e(_kind_label(k))}<br><span class=muted>{_e(rid)}<br>{_e(m)}"
                       f"{'<br>' + _e(st) if st else ''}</span></th>" for k, rid, m, st in keys)
        epochs = "".join(f"<td>{_e(', '.join(sorted({str(r.get('epoch')) for r in groups[k]})))}</td>" for k in keys)
        body = [f"<tr><td class=l><i>epoch</i></td>{epochs}</tr>"]
        for name in metric_names:
            tds = "".join(f"<td>{_cell([_metrics(r).get(name) for r in groups[k]])}</td>" for k in keys)
            body.append(f"<tr><td class=l>{_e(name)}</td>{tds}</tr>")
        parts.append(f"<h3>test domain {_e(d)}</h3><div class=scroll><table><tr><th class=l>measure</th>{head}</tr>"
                     + "".join(body) + "</table></div>")
        figs = []
        for analysis, field, subset, label, ylim in (("cka", "linear", "heldout", "linear CKA, C2 classes", None),
                                                     ("cka", "linear", "all", "linear CKA, all classes", None),
                                                     ("circuits", "node_jaccard", None, "node Jaccard", (0, 1.02))):
            series, layers = {}, None
            for k in keys:
                lay, vals = _per_layer(groups[k], analysis, field, subset, d)
                if lay is None or (layers is not None and lay != layers):
                    continue
                layers = lay
                series[f"{_kind_label(k[0])}: {k[1]}"] = vals
            if not series:
                continue
            name = f"{analysis}_{field}{'_' + subset if subset else ''}_{d}.png"
            caption = f"{label}: {d} vs {NATURAL_DOMAIN} per layer (mean over seeds)"
            plots.lines(layers, series, fig_dir / name, caption, label.split(",")[0], ylim)
            figs.append(_figure(f"analysis/{name}", caption))
        sae_vals = {f"{_kind_label(k[0])}\n{k[1]}":
                    _mean_std([_metrics(r).get("SAE sharing of D, C2") for r in groups[k]])[0] for k in keys}
        if any(math.isfinite(v) for v in sae_vals.values()):
            name = f"sae_sharing_{d}.png"
            caption = f"SAE feature-sharing score of {d}, C2 classes (mean over seeds)"
            plots.bars(list(sae_vals), list(sae_vals.values()), fig_dir / name, caption, "sharing score")
            figs.append(_figure(f"analysis/{name}", caption))
        parts.append("".join(figs))
    runs = "".join(f"<tr><td class=l>{_e(r['run'])}</td><td class=l>{_e(r.get('epoch'))}</td>"
                   f"<td class=l>{_e(', '.join(n for n in _NAMES if n in r))}</td></tr>" for r in records)
    parts.append("<details><summary>analysed runs</summary><table><tr><th class=l>run</th><th class=l>epoch</th>"
                 f"<th class=l>analyses</th></tr>{runs}</table></details>")
    return "\n".join(parts)
