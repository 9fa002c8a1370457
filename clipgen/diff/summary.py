"""Files of one diff directory: summary.md, hypotheses.jsonl, metrics.json and the two plots.

Plots are drawn on ``matplotlib.figure.Figure`` (Agg, no pyplot state) and written atomically.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from clipgen.diff.null import sentence as null_sentence
from clipgen.files import atomic_write_bytes, atomic_write_text

# The files of a diff directory besides diff.json (written last: its presence with these means finished).
FILES = ("summary.md", "hypotheses.jsonl", "metrics.json", "accuracy_vs_frequency.png", "delta_accuracy.png")
# Generator table: (metrics key, column header, decimals); verification first (the headline), discovery labelled.
GENERATOR_COLUMNS = (("hypotheses", "distinct hypotheses", 0), ("merged", "near-duplicates merged", 0),
                     ("accepted", "accepted (verification)", 0),
                     ("acceptance_rate", "acceptance rate (verification)", 3),
                     ("verification_accuracy", "accuracy (verification)", 3),
                     ("verification_frequency", "frequency (verification)", 4),
                     ("discovery_acceptance_rate", "acceptance rate (discovery, where generated)", 3),
                     ("interestingness", "interestingness", 2), ("abstraction", "abstraction", 2),
                     ("seed_consistency", "seed consistency (other seed pairs)", 2))


def clean_json(obj):
    """NaN/inf -> None, numpy scalars -> Python, so the JSON files are standard JSON."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_accuracy_vs_frequency(hyps: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot(111)
    gens = sorted({h["generator"] for h in hyps})
    markers = "osd^v<>"
    for i, g in enumerate(gens):
        for acc_flag, face in ((True, None), (False, "none")):
            pts = [(h["verification"]["frequency"], h["verification"]["accuracy"]) for h in hyps
                   if h["generator"] == g and h["accepted"] == acc_flag
                   and not math.isnan(h["verification"]["accuracy"])]
            if pts:
                x, y = zip(*pts)
                x = np.maximum(x, 1e-4)  # a log axis: zero frequency is drawn at its left edge
                label = f"{g} ({'accepted' if acc_flag else 'rejected'})"
                sc = ax.scatter(x, y, marker=markers[i % len(markers)], label=label, alpha=0.8, s=28)
                if face == "none":
                    sc.set_facecolor("none")
                    sc.set_edgecolor(f"C{i}")
                else:
                    sc.set_color(f"C{i}")
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    ax.set_xlabel("frequency on verification split")
    ax.set_ylabel("accuracy on verification split")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xscale("log")
    ax.set_xlim(8e-5, 1.2)
    if ax.get_legend_handles_labels()[0]:  # a legend only when some hypothesis has a verification accuracy
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("hypotheses: accuracy vs frequency", fontsize=10)
    return _save(fig, path)


def delta_accuracy_table(recs) -> tuple[np.ndarray, np.ndarray]:
    """(B - A accuracy, image count) per domain x class."""
    C = len(recs.classes)
    cell = recs.domain.astype(np.int64) * C + recs.label
    size = len(recs.domains) * C
    n = np.bincount(cell, minlength=size)
    d = np.bincount(cell, weights=recs.correct_b.astype(np.float64) - recs.correct_a, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(n > 0, d / np.maximum(n, 1), np.nan)
    return delta.reshape(len(recs.domains), C), n.reshape(len(recs.domains), C)


def plot_delta_heatmap(recs, path: Path, max_classes: int = 60) -> Path:
    from matplotlib.figure import Figure

    delta, _ = delta_accuracy_table(recs)
    cols = np.arange(len(recs.classes))
    if len(cols) > max_classes:  # the classes with the largest differences
        cols = np.sort(np.argsort(-np.nan_to_num(np.abs(delta)).max(axis=0), kind="stable")[:max_classes])
    fig = Figure(figsize=(max(4.0, 0.22 * len(cols) + 2), 0.45 * len(recs.domains) + 1.8))
    ax = fig.add_subplot(111)
    im = ax.imshow(delta[:, cols], cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(recs.domains)), recs.domains, fontsize=8)
    ax.set_xticks(range(len(cols)), [recs.classes[c] for c in cols], rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy B - A")
    ax.set_title("Δ accuracy (B - A) per domain x class" + (" (largest differences)" if len(cols) < len(recs.classes)
                                                            else ""), fontsize=10)
    return _save(fig, path)


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def mixture_table(run_a, run_b, domains: list[str]) -> list[str]:
    lines = [_md_row(["", f"A: {run_a.recipe_id}", f"B: {run_b.recipe_id}"]), _md_row(["---"] * 3)]
    lines.append(_md_row(["recipe kind", run_a.meta.get("recipe_kind", "?"), run_b.meta.get("recipe_kind", "?")]))
    lines.append(_md_row(["test domain", run_a.meta.get("test_domain"), run_b.meta.get("test_domain")]))
    lines.append(_md_row(["seed", run_a.meta.get("seed"), run_b.meta.get("seed")]))
    lines.append(_md_row(["training samples (recipe)", (run_a.manifest or {}).get("num_samples", "?"),
                          (run_b.manifest or {}).get("num_samples", "?")]))
    ncls = len(run_a.meta.get("classes", []))
    for d in domains:
        cells = []
        for r in (run_a, run_b):
            counts = ((r.manifest or {}).get("counts") or {}).get(d)
            if r.manifest is None:
                cells.append("?")
            elif not counts:
                cells.append("not in recipe")
            else:
                seen = sum(1 for v in counts.values() if v > 0)
                cells.append(f"{sum(counts.values())} images, {seen}/{ncls} classes")
        lines.append(_md_row([f"{d} (training)", *cells]))
    return lines


def generator_rows(generators: dict, fmt) -> list[list[str]]:
    """Rows of the generator table (``GENERATOR_COLUMNS``), numbers through ``fmt(x, decimals)``."""
    return [[g] + [fmt(m.get(k), nd) if nd else fmt(m.get(k)) for k, _, nd in GENERATOR_COLUMNS]
            for g, m in generators.items()]


def latent_line(lat: dict, fmt) -> str:
    """An SAE hypothesis's latent: the activation contrast, where it fires (enrichment), concepts, and how the
    latent itself (not the slice it compiled to) does on the verification images it fires on."""
    enr = "; ".join(f"{attr} " + ", ".join(f"{v} {share:.0%} (x{lift:g})" for v, share, lift in vals)
                    for attr, vals in (lat.get("enrichment") or {}).items() if vals)
    out = (f"SAE latent {lat['index']}: fires on {fmt(lat['active_when_b_wins'], 2)} of the images where B wins "
           f"vs {fmt(lat['active_when_a_wins'], 2)} where A wins ({lat['contrast']}), decoder share of B "
           f"{fmt(lat.get('decoder_share_b'), 2)}" + (f"; mostly {enr}" if enr else ""))
    concepts = lat.get("concepts")
    if concepts:
        out += "; concept " + " / ".join(f"{run.upper()}: '{c['concept']}'" for run, c in sorted(concepts.items()))
    v = lat.get("verification")
    if v:
        out += f"; the latent itself on verification: margin {fmt(v['margin'])} over {v['n_slice']} images"
    return out


def hypothesis_line(h: dict, fmt) -> str:
    """Verification numbers first, then discovery (labelled), merges, the seed-null check and scores."""
    d, v = h["discovery"], h["verification"]
    parts = [f"{h['generator']}"
             + (f" (also found by {', '.join(h['also_found_by'])})" if h.get("also_found_by") else ""),
             f"verification: A {v['n_a']} / B {v['n_b']} of {v['n_slice']} images, margin {fmt(v['margin'])}, "
             f"accuracy {fmt(v['accuracy'])}, frequency {fmt(v['frequency'], 4)}",
             f"discovery (where generated): margin {fmt(d['margin'])}, accuracy {fmt(d['accuracy'])}"]
    if h.get("latent"):
        parts.append(latent_line(h["latent"], fmt))
    if h.get("merged"):
        parts.append(f"merges {len(h['merged'])} near-duplicate{'s' if len(h['merged']) > 1 else ''}")
    n = h.get("null")
    if n is not None:
        verdict = {True: " (A vs B exceeds it)", False: " (A vs B does not exceed it)"}.get(n.get("exceeds"), "")
        parts.append(f"A vs null on the same images: margin {fmt(n['verification']['margin'])}{verdict}")
    if h.get("seed_consistency") is not None:
        parts.append(f"seed consistency {h['seed_consistency']:.2f}")
    parts.append(f"interestingness {h['interestingness']['score']}, abstraction {h['abstraction']['score']}")
    return "; ".join(parts)


def write_summary(path: Path, *, run_a, run_b, epoch: int, alpha: float, domain_acc: list[dict],
                  generators: dict, null: dict | None, hypotheses: list[dict], top: list[dict], domains: list[str],
                  plots: dict, llm_agreement: dict | None = None) -> None:
    L = [f"# Model diff: {run_a.name} (A) vs {run_b.name} (B)", "",
         f"Epoch {epoch}; acceptance margin α = {alpha:g}. Hypotheses are generated on the discovery split "
         "(2/3 of the images, stratified by domain x class), where every generated hypothesis passes; they are "
         "accepted or rejected on the held-out verification split (1/3), whose numbers are the headline.", "",
         "## Training mixtures", "", *mixture_table(run_a, run_b, domains), "",
         "## Accuracy per domain", "",
         _md_row(["domain", "images", "A", "B", "B - A", "seed noise (std)"]), _md_row(["---"] * 6)]
    for r in domain_acc:
        L.append(_md_row([r["domain"], r["n"], _f(r["acc_a"]), _f(r["acc_b"]), _f(r["acc_b"] - r["acc_a"]),
                          _f(r.get("seed_std"))]))
    L += ["", "## Generators", "", _md_row(["generator", *(h for _, h, _ in GENERATOR_COLUMNS)]),
          _md_row(["---"] * (len(GENERATOR_COLUMNS) + 1))]
    L += [_md_row(r) for r in generator_rows(generators, _f)]
    L += ["", "Accuracy and frequency are means over each generator's distinct hypotheses; interestingness, "
          "abstraction and seed consistency (the share of the other seed pairs of the two configurations where the "
          "hypothesis also holds; – without other seeds) over its accepted ones.", "", f"**{null_sentence(null)}**"]
    if llm_agreement:
        L += ["", "**LLM autorater vs rule-based scores**: " + "; ".join(
            f"{k}: exact {_f(a['exact'], 2)}, within one point {_f(a['within_1'], 2)}, Spearman {_f(a['spearman'], 2)} "
            f"(n = {a['n']})" for k, a in llm_agreement.items()) + "."]
    L += ["", "## Top hypotheses", ""]
    if not top:
        L.append("No hypothesis was accepted on the verification split.")
    for i, h in enumerate(top, 1):
        L += [f"{i}. **{h['text']}**  ", f"   {hypothesis_line(h, _f)}  ",
              f"   evidence: {', '.join(h['evidence']) or '–'}"]
        if h.get("paraphrase"):
            L[-1] += f"  \n   LLM paraphrase: {h['paraphrase']}"
    L += ["", "## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in plots.items()]
    L += ["", f"All {len(hypotheses)} hypotheses (near-duplicates marked duplicate_of / same_as): hypotheses.jsonl; "
          "metrics per generator and the seed-null control: metrics.json.", ""]
    atomic_write_text(path, "\n".join(L))


def write_jsonl(path: Path, hyps: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(h, sort_keys=True, allow_nan=True) + "\n" for h in hyps))
