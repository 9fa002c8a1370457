"""The study report's section on model diffs: methods comparisons, then one block per diff under ``{root}/diffs``.

``report_section(root, report_dir)`` returns an HTML fragment (``""`` when no diff exists) with, per methods
comparison (``clipgen-diff experiment=world_study diff=design_contrasts``), its tables (one per generator, paired
differences, recall); then per diff the per-generator table (and the seed-null control), the top hypotheses with
evidence, and the two plots, copied to ``report_dir/diffs/<diff name>/`` and linked relatively; the diffs a
comparison made are folded into ``<details>`` below it. Every string goes through html.escape.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from urllib.parse import quote

from clipgen.diff.null import sentence as null_sentence
from clipgen.diff.ranking import top_hypotheses
from clipgen.diff.summary import FILES, GENERATOR_COLUMNS, generator_rows, hypothesis_line
from clipgen.files import atomic_write_bytes

_PLOTS = ("accuracy_vs_frequency.png", "delta_accuracy.png")


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return _e(f"{x:.{nd}f}" if isinstance(x, float) else x)


def _plain(x, nd: int = 3) -> str:
    """A number as text (escaped later, with the line it is part of)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _top(diff_dir: Path, k: int) -> list[dict]:
    hyps = []
    try:
        with open(diff_dir / "hypotheses.jsonl", encoding="utf-8") as f:
            hyps = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []
    return top_hypotheses(hyps, k)


def _one(diff_dir: Path, report_dir: Path, k: int) -> str:
    rec = _read(diff_dir / "diff.json")
    metrics = _read(diff_dir / "metrics.json")
    if not rec or not metrics:
        return ""
    parts = [f"<h3>{_e(diff_dir.name.replace('__vs__', ' vs '))}</h3>",
             f"<p class=muted>A = {_e(Path(rec['run_a']).name)}, B = {_e(Path(rec['run_b']).name)}; epoch "
             f"{_e(rec['epoch'])}; {_e(rec['n_images'])} images; α = {_e(metrics.get('alpha'))}</p>"]
    head = "<tr><th class=l>generator</th>" + "".join(f"<th>{_e(h)}</th>" for _, h, _ in GENERATOR_COLUMNS) + "</tr>"
    rows = generator_rows(metrics["generators"], _num)
    if metrics.get("null"):  # the seed pair's own diff, for comparison
        rows += [[f"{r[0]} (A vs null {metrics['null']['run']})", *r[1:]]
                 for r in generator_rows(metrics["null"]["generators"], _num)]
    body = "".join("<tr><td class=l>" + _e(r[0]) + "</td>" + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>"
                   for r in rows)
    parts.append(f"<div class=scroll><table>{head}{body}</table></div>")
    parts.append(f"<p>{_e(null_sentence(metrics.get('null')))}</p>")
    top = _top(diff_dir, k)
    if top:
        items = []
        for h in top:
            items.append(f"<li>{_e(h['text'])} <span class=muted>({_e(hypothesis_line(h, _plain))}; "
                         f"evidence: {_e(', '.join(h.get('evidence', [])))})</span></li>")
        parts.append(f"<ol>{''.join(items)}</ol>")
    else:
        parts.append("<p>No hypothesis was accepted.</p>")
    dest = report_dir / "diffs" / diff_dir.name
    figs = []
    for name in _PLOTS:
        src = diff_dir / name
        if src.is_file():
            atomic_write_bytes(dest / name, src.read_bytes())
            rel = quote(f"diffs/{diff_dir.name}/{name}")
            figs.append(f'<figure><img src="{_e(rel)}" alt="{_e(name)}"><figcaption>{_e(name)}</figcaption></figure>')
    parts.append("".join(figs))
    return "\n".join(parts)


def _comparison(path: Path) -> tuple[str, set[str]]:
    """A methods comparison's tables (``compare--{study}/comparison.json``) and the names of its pairs' diffs."""
    comp = _read(path)
    if not comp or "tables" not in comp:
        return "", set()
    from clipgen.diff.comparison import html_tables

    return html_tables(comp), {Path(r["diff_dir"]).name for r in comp.get("pairs", [])}


def report_section(root: Path, report_dir: Path, top_k: int = 5) -> str:
    """Methods comparisons first (their pairs' diffs folded away below them), then every other diff in full."""
    base = Path(root) / "diffs"
    if not base.is_dir():
        return ""
    comparisons, in_comparison = [], set()
    for c in sorted(base.glob("compare--*/comparison.json")):
        block, names = _comparison(c)
        if block:
            comparisons.append(block)
            in_comparison |= names
    dirs = [d for d in sorted(base.iterdir()) if d.is_dir() and all((d / f).is_file() for f in FILES)
            and (d / "diff.json").is_file()]
    alone, folded = [], []
    for d in dirs:
        block = _one(d, Path(report_dir), top_k)
        if block and d.name in in_comparison:
            folded.append(f"<details><summary>{_e(d.name.replace('__vs__', ' vs '))}</summary>{block}</details>")
        elif block:
            alone.append(block)
    if not (comparisons or alone or folded):
        return ""
    intro = ("<p class=muted>clipgen-diff: hypotheses (slice × behaviour × direction) about how run B behaves "
             "differently from run A, generated on 2/3 of the images and checked by a deterministic verifier on "
             "the other 1/3, which decides acceptance.</p>")
    parts = ["<h2>Model diffs</h2>", intro, *comparisons]
    if folded:
        parts.append(f"<h3>The comparison's {len(folded)} diffs</h3>" + "".join(folded))
    return "\n".join(parts + alone)
