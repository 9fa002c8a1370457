"""The study's main figure across test domains: the paper's Fig. 2 for every test domain, with the paired
differences the paper reads off it beside each (clipgen.stats.DOMAIN_COMPARISONS), as one figure, one table
(``domains.csv``), the same tables in Markdown (``domains.md``, what the README quotes) and an HTML section.

A user who picks another test domain than the README's sees here whether the paper's directions hold there too:
each cell is a mean over seeds with its 95% t-interval and n, each difference is paired by seed (same model,
settings and seed: the same initial weights), and a run whose score is mostly one class answered for every image
(clipgen.report.collapse) is counted in its cell.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipgen.facts import TEST_DOMAINS
from clipgen.recipes.naming import FIG2_KINDS, KIND_NAMES
from clipgen.stats import DOMAIN_COMPARISONS, metric_range, separation, t_interval

COLUMNS = ["test_domain", "model_name", "settings", "row", "kind_a", "kind_b", "recipe_a", "recipe_b", "metric",
           "n", "mean", "std", "ci95_low", "ci95_high", "verdict", "n_better", "n_worse", "collapsed", "seeds",
           "per_seed"]


def _recipe_rows(final: pd.DataFrame, d: str, collapsed: set) -> list[dict]:
    metric = f"{d}-lso-ood"
    rows = final[(final["task"] == f"domainnet-{d}") & (final["metric"] == metric)
                 & final["recipe_kind"].isin(FIG2_KINDS) & np.isfinite(final["value"].astype(float))]
    out = []
    order = {k: i for i, k in enumerate(FIG2_KINDS)}
    groups = rows.groupby(["model_name", "settings", "recipe_kind", "recipe_id"], sort=True, dropna=False)
    for (model, settings, kind, rid), g in sorted(groups, key=lambda kv: (*map(str, kv[0][:2]), order[kv[0][2]],
                                                                          kv[0][3])):
        g = g.groupby(["seed", "run"], sort=True)["value"].mean().reset_index()
        stats = t_interval(g["value"].to_numpy(float), *metric_range(metric))
        out.append({"test_domain": d, "model_name": model, "settings": settings, "row": "recipe", "kind_a": kind,
                    "recipe_a": rid, "metric": metric, **stats, "verdict": "",
                    "collapsed": int(sum((r, d) in collapsed for r in g["run"])),
                    "seeds": " ".join(str(s) for s in g["seed"]),
                    "per_seed": " ".join(f"{s}:{v:.3f}" for s, v in zip(g["seed"], g["value"]))})
    return out


def domain_table(final: pd.DataFrame, paired: pd.DataFrame, conc: pd.DataFrame,
                 domains: list[str] | None = None) -> pd.DataFrame:
    """One row per (test domain, model, settings) and recipe (``row`` = "recipe": ``{D}-lso-ood`` at the final
    epoch over seeds, and how many of those runs are flagged collapse) or paper comparison (``row`` =
    "difference": A - B paired by seed from ``paired``, clipgen.stats.paired_differences, with its
    verdict)."""
    domains = [d for d in TEST_DOMAINS if d in (domains or TEST_DOMAINS)]
    collapsed = set(zip(conc.loc[conc["collapse"].astype(bool), "run"], conc.loc[conc["collapse"].astype(bool),
                                                                                "test_domain"])) \
        if not conc.empty else set()
    out = []
    for d in domains:
        out += _recipe_rows(final, d, collapsed)
        mine = paired[(paired["task"] == f"domainnet-{d}")] if not paired.empty else paired
        for kind_a, kind_b in DOMAIN_COMPARISONS:
            for p in mine[(mine["kind_a"] == kind_a) & (mine["kind_b"] == kind_b)].to_dict("records"):
                out.append({**{k: p[k] for k in ("test_domain", "model_name", "settings", "kind_a", "kind_b",
                                                  "recipe_a", "recipe_b", "metric", "n", "mean", "std",
                                                  "ci95_low", "ci95_high", "n_better", "n_worse", "seeds",
                                                  "per_seed")},
                            "row": "difference", "verdict": separation(p["ci95_low"], p["ci95_high"], p["n"])})
    table = pd.DataFrame(out, columns=COLUMNS)
    for col in ("n", "n_better", "n_worse", "collapsed"):  # counts stay integers in the CSV ("" where none)
        table[col] = table[col].astype("Int64")
    return table


# --- text ----------------------------------------------------------------------------------------------------
def kind_label(kind: str) -> str:
    return KIND_NAMES.get(kind, kind)


def difference_label(kind_a: str, kind_b: str) -> str:
    short = {"cg_high_pseudo": "pseudo", "cg_low_pseudo": "CG-low pseudo", "lod": "LOD"}
    return f"{short.get(kind_a, kind_label(kind_a))} − {short.get(kind_b, kind_label(kind_b))}"


def _fmt(r: dict, signed: bool) -> str:
    if not math.isfinite(r["mean"]):
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    ci = f" [{f.format(r['ci95_low'])}, {f.format(r['ci95_high'])}]" if r["n"] > 1 else ""
    return f"{f.format(r['mean'])}{ci}"


def domain_groups(table: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """(test domain, model, settings) groups in TEST_DOMAINS order."""
    order = {d: i for i, d in enumerate(TEST_DOMAINS)}
    groups = list(table.groupby(["test_domain", "model_name", "settings"], sort=False, dropna=False))
    return sorted(groups, key=lambda kv: (order.get(kv[0][0], 99), str(kv[0][1]), str(kv[0][2])))


def _cells(table: pd.DataFrame, markdown: bool) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Header and rows of the recipe table and the difference table (cells as text; bold = separated)."""
    kinds = [k for k in FIG2_KINDS if (table["kind_a"][table["row"] == "recipe"] == k).any()]
    comps = [c for c in DOMAIN_COMPARISONS if ((table["row"] == "difference") & (table["kind_a"] == c[0])
                                               & (table["kind_b"] == c[1])).any()]
    groups = domain_groups(table)
    several = len({(m, s) for (_, m, s), _ in groups}) > 1
    n_all = set(table.loc[table["row"] == "recipe", "n"])
    common_n = n_all.pop() if len(n_all) == 1 else None
    esc = (lambda s: s) if markdown else html.escape  # every cell of the page is escaped, numbers too
    bold = (lambda s: f"**{s}**") if markdown else (lambda s: f"<b>{html.escape(s)}</b>")
    rec_rows, diff_rows = [], []
    for (d, model, settings), g in groups:
        name = f"{d} ({model}, {settings or 'defaults'})" if several else d
        row = [esc(name)]
        for k in kinds:
            hit = g[(g["row"] == "recipe") & (g["kind_a"] == k)].to_dict("records")
            text = _fmt(hit[0], False) if hit else "–"
            if hit and hit[0]["n"] != common_n:
                text += f" (n={int(hit[0]['n'])})"
            if hit and hit[0]["collapsed"]:
                text += f", {int(hit[0]['collapsed'])} collapse"
            row.append(esc(text))
        rec_rows.append(row)
        row = [esc(name)]
        for a, b in comps:
            hit = g[(g["row"] == "difference") & (g["kind_a"] == a) & (g["kind_b"] == b)].to_dict("records")
            if not hit:
                row.append("–")
                continue
            r = hit[0]
            text = _fmt(r, True)
            row.append((bold(text) if r["verdict"] in ("A > B", "A < B") else esc(text))
                       + f" ({int(r['n_better'])}/{int(r['n'])})")
        diff_rows.append(row)
    n_note = f", n = {common_n} seeds" if common_n else ""
    rec_head = [f"test domain (mean [95% CI]{n_note})"] + [kind_label(k) for k in kinds]
    diff_head = ["test domain (paired by seed)"] + [difference_label(a, b) for a, b in comps]
    return rec_head, rec_rows, diff_head, diff_rows


def markdown(table: pd.DataFrame) -> str:
    """The two tables as GitHub Markdown: held-out-class accuracy per recipe, and the paired differences."""
    if table.empty:
        return ""
    rec_head, rec_rows, diff_head, diff_rows = _cells(table, markdown=True)
    metric = "`{D}-lso-ood`"

    def md(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])

    return (f"{metric} at the final epoch per test domain D and recipe (mean [95% t-interval]; k collapse: runs "
            "whose score is mostly one class answered for every image):\n\n" + md(rec_head, rec_rows)
            + f"\n\nDifferences of {metric} paired by seed (mean [95% t-interval] (seeds where A > B / pairs); bold: "
              "the interval excludes 0):\n\n" + md(diff_head, diff_rows) + "\n")


def section(table: pd.DataFrame, figure: Path | None, report_dir: Path) -> str:
    """The report's "Across test domains" section: the figure, then the two tables."""
    if table.empty:
        return ""
    rec_head, rec_rows, diff_head, diff_rows = _cells(table, markdown=False)

    def tbl(head, rows):
        th = "".join(f"<th class=l>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td class=l>{c}</td>" for c in r) + "</tr>" for r in rows)
        return f"<div class=scroll><table><tr>{th}</tr>{body}</table></div>"

    fig = ""
    if figure is not None:
        rel = html.escape(figure.relative_to(report_dir).as_posix())
        fig = (f'<figure><img src="{rel}" alt="Fig. 2 per test domain"><figcaption>Fig. 2 per test domain (left; '
               "mean, 95% CI, dots = seeds, dashed = chance) and the paper's paired differences (right; filled: "
               "the interval excludes 0)</figcaption></figure>")
    return ("<h2 id=domains>Across test domains</h2><p class=muted>The paper's Fig. 2 for every test domain D of "
            "this report: held-out-class accuracy in D ({D}-lso-ood) at the final epoch, and the differences the "
            "paper reads off it, paired by seed. Tables: <a href='domains.csv'>domains.csv</a>, "
            "<a href='domains.md'>domains.md</a>.</p>" + fig + tbl(rec_head, rec_rows) + tbl(diff_head, diff_rows))
