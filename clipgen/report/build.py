"""``run_report(cfg)``: a static HTML report from every evaluated run under ``paths.root`` (``clipgen-report``,
written to ``{root}/report/``), or from one study's runs (``clipgen-study``, written to
``{root}/reports/{study.name}/``).

    {root}/report/index.html           one self-contained page (inline CSS; figures as relative PNG files)
    {root}/report/summary.csv          every metric at each recipe's final epoch, aggregated over seeds
    {root}/report/learning_curves.csv  the same for every evaluated epoch
    {root}/report/paired_differences.csv  differences between recipes paired by seed (clipgen.stats)
    {root}/report/concentration.csv    prediction concentration and collapse flag per run (clipgen.report.collapse)
    {root}/report/domains.csv, .md     with 2+ test domains: Fig. 2 and the paper's paired differences per test
                                       domain (clipgen.report.domains), the .md as the README quotes it
    {root}/report/figures/*.png        Fig. 2 bars and learning curves per test domain; Fig. 3 / 13 when the
                                       interpolation / allow runs exist

    {root}/report/report_inputs.json   what the page was built from: a rerun with the same inputs does nothing

Every string that reaches the page goes through sections.escape (html.escape). With ``logger.backend=wandb`` the
figures and the summary are also logged to one W&B run per report directory (job_type "report", a stable id, so
rebuilding updates it; offline unless logger.mode says otherwise).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from clipgen import layout, rundir
from clipgen.report.analyses import report_section as analysis_section
from clipgen.diff.report import report_section as diff_section
from clipgen.errors import ClipgenError
from clipgen.facts import NATURAL_DOMAIN, TEST_DOMAINS
from clipgen.report import domains as D
from clipgen.report import figures as F
from clipgen.report import sections as S
from clipgen.report.sections import escape as _e
from clipgen.report.aggregate import CONFIG, aggregate, collect, final_epochs
from clipgen.report.collapse import COLLAPSE_TOP_SHARE, collect_concentration
from clipgen.stats import paired_differences
from clipgen.files import atomic_write_json, atomic_write_text
from clipgen.hashing import stable_hash
from clipgen.provenance import git_sha

# Tables fit the page's width instead of scrolling sideways, so a printout or a screenshot shows every column:
# cells wrap, but only where a reader would break them (between a mean and its interval, after the "-", "/",
# "_" of names and paths: clipgen.report.sections.breakable), never inside a number or a word. Printed: A4
# landscape, smaller type, nothing clipped, figures and table rows kept whole.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.muted{color:#666;font-size:.9em}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0 1.5em;max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top;white-space:normal;
overflow-wrap:normal;word-break:normal}
th{background:#f4f4f4;position:sticky;top:0}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}tr.head td{font-weight:600}
.scroll{overflow-x:auto}.nw{white-space:nowrap}.sign{font-weight:600;letter-spacing:.2em}
details pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.8em}
@page{size:A4 landscape;margin:10mm}
@media print{body{max-width:none;margin:0;padding:0;font-size:9pt}h2{margin-top:1.2em}
.scroll{overflow:visible}th{position:static}table{font-size:8pt;page-break-inside:auto}
tr,figure,img{break-inside:avoid;page-break-inside:avoid}h2,h3,p.muted{break-after:avoid;page-break-after:avoid}
figure img{max-height:120mm;width:auto}a{color:inherit}}
"""
_METRIC_ORDER = ("lso-ood", "lso-id", "lso-unweighted-ood", "lso-unweighted-id", "top5-ood", "top5-id", "macro-f1",
                 "acc", "n-ood", "n-id")


def _fmt(mean: float, low: float, high: float, n: int, metric: str) -> str:
    if not math.isfinite(mean):
        return "–"
    if metric.endswith(("-n-ood", "-n-id")):  # sample counts
        return f"{mean:.0f}"
    return S.interval(mean, low, high, n)


def _metric_order(metric: str, d: str) -> tuple:
    """D's metrics before real's; within a domain the protocol §6 order, then the per-class ones alphabetically."""
    dom, _, rest = metric.partition("-")
    rank = _METRIC_ORDER.index(rest) if rest in _METRIC_ORDER else len(_METRIC_ORDER)
    return (dom != d, dom, rank, metric)


def _recipe_key(kind: str, rid: str) -> tuple:
    order = {k: i for i, k in enumerate(F.KIND_LABELS)}
    return (order.get(kind, 99), rid)


def _final_table(summary: pd.DataFrame, task: str, d: str) -> str:
    rows = summary[summary["task"] == task]
    if rows.empty:
        return ""
    cols = sorted({tuple(c) for c in rows[CONFIG].itertuples(index=False)},
                  key=lambda c: (_recipe_key(c[0], c[1]), *c[2:]))
    cells = {(r.metric, *(getattr(r, k) for k in CONFIG)): (r.mean, r.ci95_low, r.ci95_high, r.n)
             for r in rows.itertuples()}
    head = "".join(f"<th>{_e(F.KIND_LABELS.get(k, k))}<br><span class=muted>{S.breakable(r)}<br>{S.breakable(m)}"
                   f"{'<br>' + S.breakable(st) if st else ''}</span></th>" for k, r, m, st in cols)
    last = rows.groupby(CONFIG)["epoch"].max().to_dict()
    epochs = "".join(f"<td>{_e(last.get(c, ''))}</td>" for c in cols)
    body = [f"<tr><td class=l><i>final epoch</i></td>{epochs}</tr>"]
    for metric in sorted(rows["metric"].unique(), key=lambda m: _metric_order(m, d)):
        tds = []
        for c in cols:
            v = cells.get((metric, *c))
            tds.append(f"<td>{_fmt(*v, metric) if v else ''}</td>")
        cls = " class=head" if metric in (f"{d}-lso-ood", f"{d}-lso-id") else ""
        body.append(f"<tr{cls}><td class=l>{_e(metric)}</td>{''.join(tds)}</tr>")
    return (f"<div class=scroll><table><thead><tr><th class=l>metric (mean [95% CI], n seeds)</th>{head}</tr>"
            "</thead><tbody>" + "".join(body) + "</tbody></table></div>")


def _figure(path: Path | None, report_dir: Path, caption: str) -> str:
    if path is None:
        return ""
    rel = path.relative_to(report_dir).as_posix()
    return (f'<figure><img src="{_e(rel)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


def _chance(runs: pd.DataFrame, d: str) -> float:
    n = runs.loc[runs["tasks"].str.contains(f"domainnet-{d}", regex=False), "num_classes"]
    n = n[n > 0]
    return 1.0 / float(n.max()) if len(n) else float("nan")


def _test_domains(long: pd.DataFrame) -> list[str]:
    """Test domains with a section: those a recipe was built for. Natural-only runs are evaluated on every
    test domain, so they alone add a section only when the report holds nothing else."""
    rows = long.loc[long["task"].astype(str).str.startswith("domainnet-")]
    present = set(rows["test_domain"].dropna())
    designed = set(rows.loc[rows["recipe_kind"] != "natural_only", "test_domain"].dropna())
    return [d for d in TEST_DOMAINS if d in (designed or present)]


def _inputs(root: Path, run_dirs: list[Path], title: str) -> dict:
    """Size and mtime of every file the report reads, and the code version: equal inputs, equal report."""
    files = []
    for d in run_dirs:
        files += [rundir.meta_path(d), rundir.results_path(d), *sorted(rundir.analysis_dir(d).glob("*.json")),
                  *sorted(rundir.analysis_dir(d).glob("epoch_*/*.json"))]
    files += sorted((Path(root) / "diffs").glob("*/*.json"))
    stats = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    return {"title": title, "git_sha": git_sha(), "files": stable_hash(stats, 16), "n_files": len(stats)}


def _across_domains(final, paired, conc, runs, long, report_dir: Path, fig_dir: Path) -> tuple[str, Path | None]:
    """Fig. 2 and the paper's paired differences for every test domain side by side (clipgen.report.domains),
    with domains.csv and domains.md; only when the report has two or more test domains."""
    domains = _test_domains(long)
    if len(domains) < 2:
        for old in ("domains.csv", "domains.md"):  # tables of data that is gone must not linger either
            (report_dir / old).unlink(missing_ok=True)
        return "", None
    table = D.domain_table(final, paired, conc, domains)
    atomic_write_text(report_dir / "domains.csv", table.to_csv(index=False))
    atomic_write_text(report_dir / "domains.md", D.markdown(table))
    fig = F.fig2_domains(table, {d: _chance(runs, d) for d in domains}, fig_dir / "fig2_domains.png")
    return D.section(table, fig, report_dir), fig


@dataclass
class _Tables:
    """What the page is drawn from, each also written as a CSV next to it."""

    long: pd.DataFrame  # every metric of every evaluated epoch of every run (clipgen.report.aggregate.collect)
    runs: pd.DataFrame  # one row per run
    curves: pd.DataFrame  # aggregated over seeds, every epoch
    final: pd.DataFrame  # each run's final epoch
    summary: pd.DataFrame  # the final epoch aggregated over seeds
    final_runs: pd.DataFrame  # final with the interpolation / allow facts of each run
    paired: pd.DataFrame  # differences paired by seed
    conc: pd.DataFrame  # prediction concentration per run


def _tables(long: pd.DataFrame, runs: pd.DataFrame, report_dir: Path) -> _Tables:
    curves = aggregate(long)
    final = final_epochs(long)
    summary = aggregate(final)
    atomic_write_text(report_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(report_dir / "learning_curves.csv", curves.to_csv(index=False))
    final_runs = final.merge(runs[["run", "n_extra_domains", "allow_p", "allow_base"]], on="run", how="left")
    # Pairs by seed: same task, test domain, model and settings (clipgen.rundir: every setting but the seed).
    paired = pd.concat([paired_differences(final, f"{d}-lso-ood", ["task", "test_domain", "model_name", "settings"])
                        for d in TEST_DOMAINS], ignore_index=True)
    atomic_write_text(report_dir / "paired_differences.csv", paired.to_csv(index=False))
    conc = collect_concentration(runs, final)
    atomic_write_text(report_dir / "concentration.csv", conc.to_csv(index=False))
    return _Tables(long, runs, curves, final, summary, final_runs, paired, conc)


_PAIRED_TEXT = (
    "Runs of two recipes with the same model, settings and seed start from the same weights; per seed the "
    "difference A − B, their mean and 95% t-interval (clipped to [−1, 1]). <i>Sign per seed</i> has one mark per "
    "seed, in seed order: + where recipe A scored higher than recipe B with that seed, − where lower, 0 where they "
    "tied; then how many seeds favour A, and each seed's difference as seed:(A − B). If the recipes did not "
    "differ, every sign of n seeds would agree by chance with probability 2<sup>1−n</sup> (0.0625 for n = 5: the "
    "two-sided sign test), whatever the spread of the differences.")


def _domain_section(t: _Tables, d: str, report_dir: Path, fig_dir: Path) -> tuple[str, list[Path]]:
    """One test domain's section (Fig. 2, paired differences, curves, Fig. 3 / 13, concentration, every metric)
    and the figures it drew."""
    task, chance = f"domainnet-{d}", _chance(t.runs, d)
    ood, idm = f"{d}-lso-ood", f"{d}-lso-id"
    fr = t.final_runs[t.final_runs["task"] == task]
    made = [
        (F.fig2_bars(t.final, task, ood, chance, fig_dir / f"fig2_{d}.png"),
         f"Fig. 2 — {ood} at the final epoch per recipe (mean, 95% CI clipped to [0, 1], n seeds; dots = seeds, "
         "dashed = chance)"),
        (F.learning_curves(t.curves, task, [ood, idm], chance, fig_dir / f"curves_{d}.png"),
         f"Learning curves of {ood} and {idm} over checkpoints (mean ± seed std)"),
        (F.fig3_extra_domains(fr, ood, chance, fig_dir / f"fig3_extra_domains_{d}.png"),
         f"Fig. 3 — {ood} vs number of extra domains"),
        (F.fig13_allow(fr, ood, chance, fig_dir / f"fig13_allow_{d}.png"), f"Fig. 13 — {ood} vs allow-p"),
    ]
    conc_d = t.conc[t.conc["test_domain"] == d]
    conc_fig = F.concentration(conc_d, COLLAPSE_TOP_SHARE, fig_dir / f"concentration_{d}.png")
    figures = [p for p, _ in made if p is not None] + ([conc_fig] if conc_fig else [])
    n_runs = int((t.runs["tasks"].str.contains(task, regex=False)).sum())
    page = (
        f"<h2 id='{_e(d)}'>Test domain: {_e(d)}</h2>"
        f"<p class=muted>Task {_e(task)}: test split of {_e(NATURAL_DOMAIN)} and {_e(d)}, classified over all "
        f"classes of the run (chance {chance:.3f}); {n_runs} runs. Headline: {_e(ood)} (held-out classes "
        f"in {_e(d)}).</p>"
        + "".join(_figure(p, report_dir, c) for p, c in made[:1])
        + f"<h3>Paired by seed: {_e(ood)}</h3><p class=muted>{_PAIRED_TEXT}</p>"
        + S.paired_table(t.paired[t.paired["task"] == task])
        + "".join(_figure(p, report_dir, c) for p, c in made[1:])
        + "<h3>Prediction concentration</h3>"
        + _figure(conc_fig, report_dir, f"Prediction concentration on {d} per run (red: collapse)")
        + S.concentration_table(conc_d, ood)
        + f"<h3>Every metric at the final epoch</h3>{_final_table(t.summary, task, d)}")
    return page, figures


def _page(cfg: DictConfig, title: str, runs_root: Path, t: _Tables, sections: list[str]) -> str:
    made_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    facts = S.run_facts(t.runs)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{_e(title)} — clipgen report"
        f"</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=muted>clipgen report · {len(t.runs)} runs · {_e(made_at)} · "
        f"<a href='summary.csv'>summary.csv</a> · <a href='learning_curves.csv'>learning_curves.csv</a></p>"
        + S.transfer_table(t.summary) + "".join(sections) + S.composition_table(t.runs, facts)
        + f"<h2>Runs</h2>{S.runs_table(t.runs, facts)}"
        + "<h2>How this report was made</h2>"
        f"<p>Built {_e(made_at)} by <code>{_e(' '.join(sys.argv) or 'run_report')}</code> from "
        f"<code>{_e(runs_root)}</code> with clipgen {_e(git_sha() or 'unknown')}. Aggregates are over seeds: mean, "
        "sample std, n and a 95% Student-t interval clipped to the metric's range (NaN with one seed); empty "
        "groups are NaN and left out. Paired differences: clipgen.stats; collapse flag: "
        "clipgen.report.collapse.</p>"
        f"<details><summary>config</summary><pre>{_e(OmegaConf.to_yaml(cfg))}</pre></details>"
        "</body></html>")


def _up_to_date(report_dir: Path, inputs: dict) -> bool:
    try:
        previous = json.loads((report_dir / "report_inputs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    return previous == inputs and (report_dir / "index.html").is_file()


def run_report(cfg: DictConfig, run_dirs: list[str | Path] | None = None, report_dir: Path | None = None,
               title: str | None = None) -> dict:
    """Aggregate every run's results under ``paths.root`` (or those of ``run_dirs``) into CSVs, figures and
    ``index.html`` in ``report_dir`` (default ``{root}/report``). Does nothing when the inputs are unchanged
    since the last build (``report_inputs.json``)."""
    runs_root = layout.runs_root(cfg)
    dirs = sorted(p for p in runs_root.glob("*") if rundir.results_path(p).is_file()) if run_dirs is None else \
        [Path(d) for d in run_dirs]
    report_dir = Path(report_dir) if report_dir is not None else layout.report_dir(cfg)
    title = title or str(cfg.study.name)
    inputs = _inputs(layout.root(cfg), dirs, title)
    index = report_dir / "index.html"
    if _up_to_date(report_dir, inputs):
        print(f"report: {index} (up to date)")
        return {"report": str(index), "summary": str(report_dir / "summary.csv"), "up_to_date": True}
    long, runs = collect(runs_root, dirs)
    if long.empty:
        raise ClipgenError(f"no evaluation results under {runs_root} (looked for */eval/results.jsonl): run "
                           "clipgen-eval on the trained runs first")
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of data that is gone must not linger next to the new page
        old.unlink()
    t = _tables(long, runs, report_dir)
    across, across_fig = _across_domains(t.final, t.paired, t.conc, runs, long, report_dir, fig_dir)
    sections, figures = [across], [across_fig] if across_fig else []
    for d in _test_domains(long):
        section, drawn = _domain_section(t, d, report_dir, fig_dir)
        sections.append(section)
        figures += drawn
    other = sorted(set(long["task"].astype(str)) - {f"domainnet-{d}" for d in TEST_DOMAINS})
    for task in other:
        sections.append(f"<h2>Task: {_e(task)}</h2>{_final_table(t.summary, task, '')}")
    # Sections of the later stages, when their outputs exist: mechanistic analyses (clipgen-analyze) of this
    # report's runs only, and model diffs (clipgen-diff); each writes its own figures under the report directory.
    sections.append(analysis_section(dirs, report_dir, long, int(cfg.analysis.seed)))
    sections.append(diff_section(layout.root(cfg), report_dir))
    atomic_write_text(index, _page(cfg, title, runs_root, t, sections))
    if cfg.logger.get("backend") == "wandb":
        _log_wandb(cfg, report_dir, figures, t.summary, title)
    atomic_write_json(report_dir / "report_inputs.json", inputs)
    print(f"report: {index}")
    return {"report": str(index), "summary": str(report_dir / "summary.csv"),
            "figures": [str(p) for p in figures], "runs": int(len(runs))}


def _log_wandb(cfg: DictConfig, report_dir: Path, figures: list[Path], summary: pd.DataFrame, title: str) -> None:
    """One W&B run per report directory (stable id): a rebuilt report updates it instead of adding another."""
    import wandb

    from clipgen.wandb_run import check_logger_config, group_of, open_run, stable_run_id

    check_logger_config(cfg)
    ident = {"project": str(cfg.logger.project), "group": group_of(cfg), "name": f"report-{title}",
             "job_type": "report", "tags": [str(t) for t in (cfg.logger.get("tags") or [])]}
    run = open_run(cfg.logger.mode, report_dir, stable_run_id(report_dir), ident,
                   config=OmegaConf.to_container(cfg, resolve=True))
    try:
        run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in figures})
        run.log({"report/summary": wandb.Table(dataframe=summary)})
    finally:
        wandb.finish()
