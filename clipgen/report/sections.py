"""HTML pieces of the report that read more than the results: what each run's settings and W&B run are, the
recipes' composition, differences paired by seed, the natural-only transfer matrix and prediction concentration.

Every string that reaches the page goes through html.escape; every interval is shown with its n.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import pandas as pd

from clipgen.facts import DOMAINS, NATURAL_DOMAIN, TEST_DOMAINS
from clipgen import recipedir, rundir
from clipgen.recipes.naming import KIND_NAMES
from clipgen.report.collapse import COLLAPSE_OVER_TRUE, COLLAPSE_TOP_SHARE


def escape(x) -> str:
    """``x`` as text for the page (None as empty), HTML-escaped: every string the report writes goes through it."""
    return html.escape("" if x is None else str(x))


_e = escape


_BREAK_AFTER = re.compile(r"[/_]")  # browsers already break after a hyphen
_LONG_HEX = re.compile(r"[0-9a-f]{17,}")


def breakable(x) -> str:
    """``x`` escaped, with line-break opportunities (``<wbr>``) where a reader would break a run name, a path or
    a hash: after ``/`` and ``_`` and every 16 hex digits (browsers break after ``-`` themselves, so a run name
    stays as it is written). A table of such names then fits the page by wrapping them at those points instead of
    scrolling sideways (or, with CSS's break-all, wrapping at every character)."""
    text = "" if x is None else str(x)
    text = _LONG_HEX.sub(lambda m: "\x00".join(m.group(0)[i:i + 16] for i in range(0, len(m.group(0)), 16)), text)
    text = _BREAK_AFTER.sub(lambda m: m.group(0) + "\x00", text)
    return html.escape(text).replace("\x00", "<wbr>")


def _num(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def interval(mean: float, low: float, high: float, n: int, digits: int = 3, signed: bool = False) -> str:
    """``mean [low, high] (n=…)``; the interval is left out below two values. A narrow cell wraps it between the
    mean and the interval and before ``(n=…)``, never inside the interval (a no-break space after its comma)."""
    if not math.isfinite(mean):
        return "–"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    ci = f" [{f.format(low)},\u00a0{f.format(high)}]" if n > 1 and math.isfinite(low) else ""
    return f"{f.format(mean)}{ci} <span class=muted>(n={int(n)})</span>"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x == ""


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th class=l>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td class=l>{c}</td>" for c in r) + "</tr>" for r in rows)
    # thead: a printed table that runs over a page repeats its header row there
    return f"<div class='scroll {cls}'><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


# --- facts about each run ------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recipe_dir(meta: dict, run_dir: Path) -> Path | None:
    path = meta.get("recipe_dir")
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def run_facts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: the W&B run id and its local directory, and the recipe dir (the run's ``settings`` come from its
    name, clipgen.rundir, in the runs table itself)."""
    out = []
    for r in runs.to_dict("records"):
        run_dir = Path(r["run_dir"])
        meta = rundir.read_meta(run_dir) or {}
        wid = meta.get("wandb_id")
        local = sorted(run_dir.glob(f"wandb/*run-*-{wid}")) if wid else []
        recipe = _recipe_dir(meta, run_dir)
        out.append({"run": r["run"], "wandb_id": wid,
                    "wandb_dir": local[-1].relative_to(run_dir).as_posix() if local else None,
                    "recipe_path": str(recipe) if recipe else None})
    return pd.DataFrame(out, columns=["run", "wandb_id", "wandb_dir", "recipe_path"])


# --- recipe composition --------------------------------------------------------------------------------------
def composition_table(runs: pd.DataFrame, facts: pd.DataFrame) -> str:
    """Per recipe the runs used and per domain: images, classes, and how many held-out classes kept images
    (from manifest.json ``counts``); the recipe's total from sizes.json next to the manifest's count."""
    rows = []
    seen = set()
    merged = runs.merge(facts[["run", "recipe_path"]], on="run", how="left")
    for r in merged.sort_values(["recipe_kind", "recipe_id"]).to_dict("records"):
        path = r.get("recipe_path")
        if not path or path in seen:
            continue
        seen.add(path)
        manifest = _read_json(recipedir.manifest_path(path))
        sizes = _read_json(recipedir.sizes_path(path))
        if not manifest:
            rows.append([_e(r["recipe_id"]), _e(KIND_NAMES.get(r["recipe_kind"], r["recipe_kind"])),
                         "<span class=muted>manifest.json not found</span>", "", "", "", "", ""])
            continue
        counts = manifest.get("counts") or {}
        if not counts:
            rows.append([_e(r["recipe_id"]), _e(KIND_NAMES.get(r["recipe_kind"], r["recipe_kind"])),
                         "<span class=muted>manifest.json has no counts</span>", "", "", "", "", ""])
            continue
        heldout = set(manifest.get("heldout_classes") or [])
        total = sum(int(v) for v in sizes.values()) if isinstance(sizes, dict) else None
        base = (manifest.get("base") or {}).get("num_samples")
        note = "" if total is None or total == manifest.get("num_samples") else \
            f" <b>≠ manifest num_samples {_e(manifest.get('num_samples'))}</b>"
        head = [breakable(r["recipe_id"]), _e(KIND_NAMES.get(r["recipe_kind"], r["recipe_kind"])),
                f"{_e(total if total is not None else '–')}{note}", _e(base if base is not None else "–")]
        doms = [d for d in DOMAINS if d in counts] + sorted(set(counts) - set(DOMAINS))
        for i, d in enumerate(doms):
            per = {c: int(n) for c, n in (counts.get(d) or {}).items() if int(n) > 0}
            kept = sorted(c for c in per if c in heldout)
            rows.append((head if i == 0 else ["", "", "", ""]) + [
                _e(d), _e(sum(per.values())), _e(len(per)),
                f"{len(kept)} of {len(heldout)}" + (f" <span class=muted>({_e(', '.join(kept))})</span>"
                                                     if kept else "")])
    if not rows:
        return ""
    return ("<h2 id=recipes>Recipes</h2><p class=muted>From each recipe's manifest.json (<code>counts</code>) and "
            "sizes.json. Held-out kept: held-out classes (C2) with at least one training image in that domain.</p>"
            + _table(["recipe", "kind", "images (sizes.json)", "base corpus", "domain", "images", "classes",
                      "held-out classes kept"], rows))


# --- paired differences --------------------------------------------------------------------------------------
def paired_table(pairs: pd.DataFrame) -> str:
    """The rows of :func:`clipgen.stats.paired_differences` for one task, as HTML."""
    if pairs.empty:
        return ("<p class=muted>No recipes to pair: a paired difference needs two recipes run with the same "
                "model, settings and seed.</p>")
    many_models = pairs["model_name"].nunique() > 1
    many_settings = pairs["settings"].nunique() > 1
    rows = []
    for p in pairs.to_dict("records"):
        seeds = " ".join(f"<span title='seed {_e(s)}'>{'+' if float(d) > 0 else ('−' if float(d) < 0 else '0')}"
                         f"</span>" for s, d in (x.split(":") for x in p["per_seed"].split()))
        if p["n"] < 2:
            verdict = "one pair: no interval"
        elif p["ci95_low"] > 0:
            verdict = "A > B (CI above 0)"
        elif p["ci95_high"] < 0:
            verdict = "A < B (CI below 0)"
        else:
            verdict = "CI includes 0"
        what = (f"{_e(KIND_NAMES.get(p['kind_a'], p['kind_a']))} − {_e(KIND_NAMES.get(p['kind_b'], p['kind_b']))}"
                f"<br><span class=muted>{breakable(p['recipe_a'])} − {breakable(p['recipe_b'])}</span>")
        row = [what] + ([breakable(p["model_name"])] if many_models else []) + \
            ([breakable(p["settings"])] if many_settings else [])
        n_pairs, better, worse = len(p["per_seed"].split()), int(p["n_better"]), int(p["n_worse"])
        words = f"A higher with {better} of {n_pairs} seeds" + (f", lower with {worse}" if worse else "") + (
            f", tied with {n_pairs - better - worse}" if n_pairs - better - worse else "")
        row += [interval(p["mean"], p["ci95_low"], p["ci95_high"], p["n"], signed=True),
                f"<span class='nw sign'>{seeds}</span><br>{_e(words)}<br><span class=muted>seed:(A − B) "
                f"{_e(p['per_seed'])}</span>", _e(verdict)]
        if p["unpaired"]:
            row[-1] += f" <span class=muted>({p['unpaired']} unpaired seeds left out)</span>"
        rows.append(row)
    head = ["A − B"] + (["model"] if many_models else []) + (["settings"] if many_settings else [])
    head += ["mean difference [95% CI] (n pairs)", "sign per seed (+: A higher)", "verdict"]
    return _table(head, rows)


# --- natural-only transfer -----------------------------------------------------------------------------------
def transfer_table(summary: pd.DataFrame) -> str:
    """Natural-only runs (trained on real only) evaluated on every test domain: per metric kind and model, the
    mean [95% CI] (n seeds) on real and each test domain at the final epoch."""
    nat = summary[summary["recipe_kind"] == "natural_only"]
    if nat.empty:
        return ""
    doms = [NATURAL_DOMAIN] + [d for d in TEST_DOMAINS if (nat["task"] == f"domainnet-{d}").any()]
    rows = []
    for (rid, model), g in nat.groupby(["recipe_id", "model_name"], sort=True):
        for kind in ("lso-ood", "lso-id", "acc"):
            cells = []
            for d in doms:
                hit = g[g["metric"] == f"{d}-{kind}"]
                # real's test images are the same in every task: take the first task's numbers
                hit = hit[hit["task"].astype(str).str.startswith("domainnet-")] if d == NATURAL_DOMAIN \
                    else hit[hit["task"] == f"domainnet-{d}"]
                c = hit.iloc[0] if len(hit) else None
                cells.append(interval(c["mean"], c["ci95_low"], c["ci95_high"], c["n"]) if c is not None else "–")
            rows.append([breakable(rid), breakable(model), f"<span class=nw>{_e(kind)}</span>", *cells])
    return ("<h2 id=transfer>Natural-only transfer from real</h2><p class=muted>Runs trained on real images only, "
            "evaluated on the test split of every domain at their final epoch: mean [95% t-interval clipped to "
            "[0, 1]] (n seeds). lso-ood: held-out classes (C2); lso-id: the other classes; acc: all classes.</p>"
            + _table(["recipe", "model", "metric", *map(_e, doms)], rows))


# --- prediction concentration --------------------------------------------------------------------------------
def concentration_table(conc: pd.DataFrame, metric: str) -> str:
    """Per run of one test domain: its score, the most-predicted class and its share, the normalised entropy of
    the predictions, the score of always answering that class, and the collapse flag."""
    if conc.empty:
        return ("<p class=muted>No saved predictions (eval/outputs/epoch_NNN.npz) at the final epoch: "
                "run clipgen-eval with eval.save_outputs=true to see prediction concentration.</p>")
    rows = []
    order = {k: i for i, k in enumerate(KIND_NAMES)}
    conc = conc.assign(_o=conc["recipe_kind"].map(lambda k: order.get(k, 99)))
    for r in conc.sort_values(["_o", "recipe_id", "model_name", "seed"]).to_dict("records"):
        flag = "<b style='color:#b00'>COLLAPSE</b>" if r["collapse"] else ""
        rows.append([_e(KIND_NAMES.get(r["recipe_kind"], r["recipe_kind"])), _e(r["seed"]), _e(r["epoch"]),
                     _num(r["score"]), _e(r["top_class"]), _num(r["top_share"]), _num(r["true_top_share"]),
                     _num(r["norm_entropy"]), _num(r["constant_score"]), flag, breakable(r["run"])])
    return (f"<p class=muted>Predictions on the {int(conc['n_images'].max())} test images of the domain at each "
            f"run's final epoch. Flag COLLAPSE: the most-predicted class takes ≥ {COLLAPSE_TOP_SHARE:.0%} of them "
            f"and ≥ {COLLAPSE_OVER_TRUE:g}× the share of the commonest true class; such a {_e(metric)} is mostly "
            "the constant answer's score (column 'constant').</p>"
            + _table(["recipe", "seed", "epoch", _e(metric), "top class", "top share", "true top share",
                      "entropy / log K", "constant", "flag", "run"], rows))


# The runs table's columns: a heading and the run's values stacked in it (one per line), so that every value is
# shown in full and the table still fits the page.
_RUN_COLUMNS = (("run", ("run",)), ("recipe<br>kind", ("recipe_id", "recipe_kind")),
                ("test domain<br>seed", ("test_domain", "seed")), ("model<br>settings", ("model_name", "settings")),
                ("epochs evaluated<br>last epoch", ("epochs_evaluated", "last_epoch")),
                ("tasks<br>templates", ("tasks", "templates")), ("W&amp;B run id<br>W&amp;B local dir",
                                                                 ("wandb_id", "wandb_dir")),
                ("run directory", ("run_dir",)), ("train git sha<br>manifest sha256", ("git_sha", "manifest_sha256")))


def runs_table(runs: pd.DataFrame, facts: pd.DataFrame) -> str:
    """Every run with its directory and W&B run, in full: related values share a column, one per line, and long
    names, paths and hashes wrap at their separators (:func:`breakable`), so the table fits a printed page."""
    merged = runs.merge(facts[["run", "wandb_id", "wandb_dir"]], on="run", how="left")
    rows = [["<br>".join("–" if _missing(r.get(k)) else breakable(r.get(k)) for k in keys) for _, keys in _RUN_COLUMNS]
            for r in merged.sort_values(["test_domain", "recipe_kind", "recipe_id", "seed"]).to_dict("records")]
    return _table([h for h, _ in _RUN_COLUMNS], rows)
