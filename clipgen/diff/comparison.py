"""The methods comparison's statistics and tables (pure: rows in, numbers and text out).

Input: one row per diffed pair (``compare.py``): its kind ("contrast": two recipes at one seed; "null": two seeds
of one recipe), its contrast label and seed, and the per-generator metrics of its ``diff.json``. Output:

- per generator, per contrast (and "all contrasts": each seed's mean over the contrasts): every metric of
  ``METRICS`` as mean [95% t-interval] over seeds (``clipgen.stats.t_interval``, clipped to the metric's
  range; a seed whose value is undefined, e.g. interestingness with nothing accepted, is left out of n);
- per generator, the seed-null pairs: the same metrics over the null pairs, and how many accepted anything (every
  hypothesis accepted there is a false discovery: two seeds of one recipe have no designed difference);
- paired differences between generators (each simpler generator minus the reference, the SAE generator when it
  ran), paired by diffed pair, per contrast and over all contrasts, with the number of seeds each side is higher;
- the recall check: in how many seeds of the recall contrast each generator's top k accepted hypotheses hold the
  designed difference.
"""
from __future__ import annotations

import html
import math

import numpy as np

from clipgen.stats import t_interval

# (metrics key, column header, decimals, range of the value)
METRICS = (("hypotheses", "distinct hypotheses", 1, (0.0, math.inf)),
           ("accepted", "accepted", 1, (0.0, math.inf)),
           ("acceptance_rate", "acceptance rate", 3, (0.0, 1.0)),
           ("verification_accuracy", "verification accuracy", 3, (0.0, 1.0)),
           ("verification_frequency", "frequency", 4, (0.0, 1.0)),
           ("interestingness", "interestingness", 2, (1.0, 5.0)),
           ("abstraction", "abstraction", 2, (1.0, 5.0)),
           ("seed_consistency", "seed consistency", 2, (0.0, 1.0)))
ALL = "all contrasts"
OVERVIEW = ("Each generator over all contrasts (per seed the mean over the contrasts, then mean [95% CI] over the "
            "seeds), beside what it accepts on the seed-null pairs and the recall check.")


def _value(row: dict, gen: str, key: str) -> float:
    v = (row["generators"].get(gen) or {}).get(key)
    return float("nan") if v is None else float(v)


def _interval(values, rng) -> dict:
    return t_interval(values, *rng)


def _nanmean(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _per_seed_means(rows: list[dict], gen: str, key: str) -> dict:
    """Seed -> mean of ``key`` over that seed's contrasts (NaN-aware; NaN when none is defined)."""
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(_value(r, gen, key))
    return {s: _nanmean(v) for s, v in by_seed.items()}


def generator_tables(rows: list[dict], generators: list[str], contrasts: list[str]) -> dict:
    """gen -> list of {"contrast", "n_pairs", key: interval} rows: each contrast, "all contrasts", "seed-null"."""
    out = {}
    cont = [r for r in rows if r["kind"] == "contrast"]
    null = [r for r in rows if r["kind"] == "null"]
    for g in generators:
        table = []
        for c in contrasts:
            rs = [r for r in cont if r["contrast"] == c]
            table.append({"contrast": c, "n_pairs": len(rs),
                          **{k: _interval([_value(r, g, k) for r in rs], rng) for k, _, _, rng in METRICS}})
        if len(contrasts) > 1:
            table.append({"contrast": ALL, "n_pairs": len({r["seed"] for r in cont}),
                          **{k: _interval(list(_per_seed_means(cont, g, k).values()), rng)
                             for k, _, _, rng in METRICS}})
        if null:
            table.append({"contrast": "seed-null pairs", "n_pairs": len(null),
                          "with_accepted": sum(_value(r, g, "accepted") > 0 for r in null),
                          **{k: _interval([_value(r, g, k) for r in null], rng) for k, _, _, rng in METRICS}})
        out[g] = table
    return out


def reference_generator(generators: list[str]) -> str:
    return "sae" if "sae" in generators else generators[-1]


def paired_tables(rows: list[dict], generators: list[str], contrasts: list[str]) -> list[dict]:
    """Rows {"a", "b", "contrast", key: interval + n_higher / n_lower} of a - b, paired by diffed pair (per
    contrast) or by seed (all contrasts: each seed's mean difference over its contrasts)."""
    ref = reference_generator(generators)
    cont = [r for r in rows if r["kind"] == "contrast"]
    out = []
    for g in [g for g in generators if g != ref]:
        for c in contrasts + ([ALL] if len(contrasts) > 1 else []):
            rs = cont if c == ALL else [r for r in cont if r["contrast"] == c]
            row = {"a": g, "b": ref, "contrast": c}
            for k, _, _, (lo, hi) in METRICS:
                diffs = {}
                for r in rs:
                    d = _value(r, g, k) - _value(r, ref, k)
                    diffs.setdefault(r["seed"], []).append(d)
                per_seed = [_nanmean(v) for v in diffs.values()]
                width = hi - lo
                iv = t_interval(per_seed, -width, width)
                fin = [x for x in per_seed if np.isfinite(x)]
                row[k] = {**iv, "n_higher": sum(x > 0 for x in fin), "n_lower": sum(x < 0 for x in fin)}
            out.append(row)
    return out


def designed_match(h: dict, cells: set[tuple[str, str]], min_jaccard: float) -> bool:
    """``h`` says B does better (correct / true-class probability) on a set of domain x class cells whose
    Jaccard index with the designed cells is at least ``min_jaccard``."""
    if h["direction"] != "B" or h["behaviour"] not in ("correct", "true_prob") or not h.get("cells"):
        return False
    own = {tuple(c) for c in h["cells"]}
    return len(own & cells) / len(own | cells) >= min_jaccard


def recall_summary(found: list[dict], generators: list[str]) -> dict:
    """``found``: per seed {gen: rank of the first match in the top k, or None}. -> per gen counts and ranks."""
    return {g: {"found": sum(f[g] is not None for f in found), "seeds": len(found),
                "ranks": [f[g] for f in found]} for g in generators}


def fmt_interval(iv: dict, nd: int, signed: bool = False) -> str:
    """'0.412 [0.301, 0.523]'; the mean and n alone when there is no interval (n < 2); '–' when undefined."""
    m, lo, hi = iv.get("mean"), iv.get("ci95_low"), iv.get("ci95_high")
    if m is None or not np.isfinite(m):
        return "–"
    f = f"{{:{'+' if signed else ''}.{nd}f}}"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{f.format(m)} (n={iv.get('n', 0)})"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def _verdict(iv: dict) -> str:
    lo, hi = iv.get("ci95_low"), iv.get("ci95_high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "n < 2"
    return "higher" if lo > 0 else "lower" if hi < 0 else "not separated"


def overview_rows(comp: dict) -> tuple[list[str], list[list[str]]]:
    """One row per generator: its "all contrasts" numbers (the only contrast's, when there is one), what it
    accepts on the seed-null pairs, and the recall check."""
    keys = ("hypotheses", "acceptance_rate", "verification_accuracy", "verification_frequency", "interestingness",
            "abstraction", "seed_consistency")
    nd = {k: d for k, _, d, _ in METRICS}
    head = (["generator"] + [h for k, h, _, _ in METRICS if k in keys]
            + ["accepted per seed-null pair", "seed-null pairs with one accepted"]
            + ([f"designed difference in its top {comp['recall']['top']}"] if comp.get("recall") else []))
    body = []
    for g in comp["generators"]:
        rows = comp["tables"][g]
        main = next((r for r in rows if r["contrast"] == ALL), rows[0])
        null = next((r for r in rows if r["contrast"] == "seed-null pairs"), None)
        row = [g] + [fmt_interval(main[k], nd[k]) for k in keys]
        row += ([fmt_interval(null["accepted"], 1), f"{null['with_accepted']} of {null['n_pairs']}"] if null
                else ["–", "–"])
        if comp.get("recall"):
            v = comp["recall"]["generators"][g]
            row.append(f"{v['found']} of {v['seeds']} seeds")
        body.append(row)
    return head, body


def table_rows(comp: dict) -> dict:
    """Plain-text cells of every table: {"overview": (header, rows), "generators": {g: (header, rows)},
    "paired": (header, rows), "recall": (header, rows) or None}."""
    head = ["contrast", "pairs"] + [h for _, h, _, _ in METRICS] + ["null pairs with an accepted hypothesis"]
    gens = {}
    for g in comp["generators"]:  # the run order (the JSON file's keys are sorted)
        rows, body = comp["tables"][g], []
        for r in rows:
            extra = f"{r['with_accepted']} of {r['n_pairs']}" if "with_accepted" in r else ""
            body.append([r["contrast"], str(r["n_pairs"])] + [fmt_interval(r[k], nd) for k, _, nd, _ in METRICS]
                        + [extra])
        gens[g] = (head, body)
    phead = ["difference", "contrast"] + [h for _, h, _, _ in METRICS]
    pbody = []
    for r in comp["paired"]:
        cells = []
        for k, _, nd, _ in METRICS:
            iv = r[k]
            cells.append(f"{fmt_interval(iv, nd, signed=True)} {iv['n_higher']}:{iv['n_lower']} {_verdict(iv)}"
                         if iv.get("n") else "–")
        pbody.append([f"{r['a']} − {r['b']}", r["contrast"]] + cells)
    rec = None
    if comp.get("recall"):
        rc, body = comp["recall"], []
        for g in comp["generators"]:
            v = rc["generators"][g]
            body.append([g, f"{v['found']} of {v['seeds']}",
                         " ".join("–" if x is None else str(x) for x in v["ranks"])])
        rec = (["generator", f"seeds with the designed difference in its top {rc['top']}", "rank per seed"], body)
    return {"overview": overview_rows(comp), "generators": gens, "paired": (phead, pbody), "recall": rec}


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    row = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return [row(head), row(["---"] * len(head))] + [row(b) for b in body]


def markdown(comp: dict) -> str:
    t = table_rows(comp)
    L = [f"# Methods comparison: {comp['study']}", "", comp["intro"], "", "## Overview", "",
         OVERVIEW, "",
         *_md_table(*t["overview"]), ""]
    for g, (head, body) in t["generators"].items():
        L += [f"## {g}", "", *_md_table(head, body), ""]
    L += ["## Paired differences between generators", "",
          "Mean difference [95% CI] over seeds, seeds where the first is higher : lower, and whether the interval "
          "excludes 0.", "", *_md_table(*t["paired"]), ""]
    if t["recall"]:
        L += ["## Recall of the designed difference", "", comp["recall"]["criterion"], "", *_md_table(*t["recall"]),
              ""]
    return "\n".join(L)


def html_tables(comp: dict) -> str:
    e = html.escape
    t = table_rows(comp)

    def tab(head, body):
        h = "<tr>" + "".join(f"<th class=l>{e(c)}</th>" if i < 2 else f"<th>{e(c)}</th>"
                             for i, c in enumerate(head)) + "</tr>"
        b = "".join("<tr>" + "".join(f"<td class=l>{e(c)}</td>" if i < 2 else f"<td>{e(c)}</td>"
                                     for i, c in enumerate(row)) + "</tr>" for row in body)
        return f"<div class=scroll><table>{h}{b}</table></div>"

    parts = [f"<h3>Methods comparison: {e(comp['study'])}</h3>", f"<p class=muted>{e(comp['intro'])}</p>",
             f"<h4>Overview</h4><p class=muted>{e(OVERVIEW)}</p>", tab(*t["overview"])]
    for g, (head, body) in t["generators"].items():
        parts += [f"<h4>{e(g)}</h4>", tab(head, body)]
    parts += ["<h4>Paired differences between generators</h4>",
              "<p class=muted>Mean difference [95% CI] over seeds; seeds where the first is higher : lower; whether "
              "the interval excludes 0.</p>", tab(*t["paired"])]
    if t["recall"]:
        parts += ["<h4>Recall of the designed difference</h4>", f"<p>{e(comp['recall']['criterion'])}</p>",
                  tab(*t["recall"])]
    return "\n".join(parts)
