"""``run_comparison(cfg)``: the diffing paper's methods comparison on a study's runs.

    clipgen-diff experiment=world_study diff=design_contrasts   # the contrasts of conf/diff/design_contrasts.yaml
    clipgen-diff experiment=world_study 'diff.contrasts=[[cg_high,lod],[cg_low,cg_high]]'

For every test domain of ``study.test_domains``, every contrast [A, B] of ``diff.contrasts`` (two study recipe
entries) and every seed of ``study.seeds``, the runs of A and B at that seed are diffed as ``clipgen-diff
run_a=... run_b=...`` would (each pair an ordinary diff directory, keyed, so a rerun skips finished pairs and an
interrupted comparison resumes); so are the seed-null pairs, seeds (0, 1), (2, 3), ... of every recipe in the
contrasts (disjoint pairs, so they are independent). Then ``comparison.py`` aggregates the pairs' per-generator
metrics over seeds, and ``{root}/diffs/compare--{study.name}/`` gets comparison.json, comparison.md (one table per
generator, paired differences between generators, the recall check) and pairs.csv (one row per pair and
generator). The study's runs are located exactly as ``clipgen-study`` names them, so the same overrides that
trained a study compare it.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from clipgen import layout, rundir
from clipgen.diff import comparison as C
from clipgen.diff.ranking import generator_top
from clipgen.diff.summary import clean_json
from clipgen.config import copy_config
from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_json, atomic_write_text, read_json
from clipgen.hashing import stable_hash

RECALL_JACCARD = 0.5  # a hypothesis holds the designed difference when its cells overlap the designed ones this much
# Settings of the comparison only: they do not change a pair's diff, so they stay out of its key (clipgen.diff.run)
# and a changed contrast list reuses every finished pair.
COMPARISON_KEYS = ("contrasts", "recall_contrast", "recall_top")


def pair_settings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in COMPARISON_KEYS}


def _contrasts(d: dict) -> list[tuple[str, str]]:
    out = []
    for c in d["contrasts"]:
        if len(c) != 2:
            raise ClipgenError(f"diff.contrasts entry {list(c)}: expected two study recipe entries [A, B], e.g. "
                               "[cg_high, lod]")
        out.append((str(c[0]), str(c[1])))
    rc = d.get("recall_contrast") or []
    if rc and (len(rc) != 2 or (str(rc[0]), str(rc[1])) not in out):
        raise ClipgenError(f"diff.recall_contrast={list(rc)}: expected one of diff.contrasts, e.g. "
                           "[cg_high, cg_high_pseudo]")
    return out


def _run_dir(cfg: DictConfig, test_domain: str, recipe: str, seed: int) -> Path:
    from clipgen.recipes.grid import Job, job_config, run_dir_of  # the study's own naming of its runs

    try:
        return run_dir_of(job_config(cfg, Job(test_domain, recipe, int(seed))))
    except ClipgenError as e:
        raise ClipgenError(f"diff.contrasts entry {recipe!r}: {e}") from None


def plan(cfg: DictConfig, d: dict) -> list[dict]:
    """Every pair to diff: the contrasts at each seed, then the seed-null pairs (duplicates dropped: natural-only
    is one run for every test domain)."""
    contrasts, seeds = _contrasts(d), [int(s) for s in cfg.study.seeds]
    domains = [str(t) for t in cfg.study.test_domains]
    pairs, seen = [], set()

    def add(**p):
        if (p["dir_a"], p["dir_b"]) not in seen:
            seen.add((p["dir_a"], p["dir_b"]))
            pairs.append(p)

    for td in domains:
        suffix = f" ({td})" if len(domains) > 1 else ""
        for a, b in contrasts:
            for s in seeds:
                add(kind="contrast", contrast=f"{a} vs {b}{suffix}", a=a, b=b, test_domain=td, seed=s,
                    dir_a=_run_dir(cfg, td, a, s), dir_b=_run_dir(cfg, td, b, s))
        for r in dict.fromkeys(x for c in contrasts for x in c):
            for s0, s1 in zip(seeds[0::2], seeds[1::2]):
                add(kind="null", contrast=f"{r} seed null{suffix}", a=r, b=r, test_domain=td, seed=f"{s0}-{s1}",
                    dir_a=_run_dir(cfg, td, r, s0), dir_b=_run_dir(cfg, td, r, s1))
    missing = sorted({str(p) for q in pairs for p in (q["dir_a"], q["dir_b"]) if not rundir.outputs(p)})
    if missing:
        raise ClipgenError(f"{len(missing)} run(s) of the comparison have no evaluation outputs, e.g. {missing[0]}: "
                           "train and evaluate the study first (clipgen-study with the same overrides)")
    if not pairs:
        raise ClipgenError("diff.contrasts gave no pair to diff: expected contrasts and study.seeds")
    return pairs


def _diff(cfg: DictConfig, pair: dict, diff_runs) -> dict:
    """One pair's diff (``clipgen.diff.run.diff_runs``, skipped when finished) -> the comparison's row for it."""
    sub = copy_config(cfg)
    with open_dict(sub):
        sub.run_a, sub.run_b, sub.null_run = str(pair["dir_a"]), str(pair["dir_b"]), None
    res = diff_runs(sub, quiet=True)
    return {**{k: pair[k] for k in ("kind", "contrast", "a", "b", "test_domain", "seed")},
            "run_a": Path(res["run_a"]).name, "run_b": Path(res["run_b"]).name, "dir_a": res["run_a"],
            "diff_dir": res["diff_dir"],
            "key": res["key"], "epoch": res["epoch"], "computed": not res["skipped"],
            "generators": {g: {k: v for k, v in m.items() if not isinstance(v, dict)}
                           for g, m in res["generators"].items()}}


def _designed_cells(row: dict) -> set[tuple[str, str]]:
    meta = rundir.load_meta(Path(row["dir_a"]))
    return {(str(meta.get("test_domain")), str(c)) for c in meta.get("heldout_classes", [])}


def recall(rows: list[dict], d: dict, generators: list[str]) -> dict | None:
    rc = d.get("recall_contrast") or []
    if not rc:
        return None
    k = int(d["recall_top"])
    found = []
    for row in rows:
        if row["kind"] != "contrast" or (row["a"], row["b"]) != (str(rc[0]), str(rc[1])):
            continue
        cells = _designed_cells(row)
        with open(Path(row["diff_dir"]) / "hypotheses.jsonl", encoding="utf-8") as f:
            hyps = [json.loads(line) for line in f if line.strip()]
        per = {}
        for g in generators:
            top = generator_top(hyps, g, k)
            per[g] = next((i for i, h in enumerate(top, 1) if C.designed_match(h, cells, RECALL_JACCARD)), None)
        found.append(per)
    return {"contrast": f"{rc[0]} vs {rc[1]}", "top": k, "generators": C.recall_summary(found, generators),
            "criterion": (f"{rc[0]} vs {rc[1]}: the designed difference is 'run B is better (correct more often, or a "
                          f"higher true-class probability) on the test domain's held-out classes'. A generator finds "
                          f"it in a seed when one of its top {k} accepted hypotheses (ranked by discovery evidence, "
                          f"its own near-duplicates merged) says so on domain x class cells whose Jaccard index with "
                          f"the test domain x held-out cells is at least {RECALL_JACCARD}.")}


def pairs_csv(rows: list[dict]) -> str:
    cols = ["kind", "contrast", "test_domain", "seed", "run_a", "run_b", "generator"] + [k for k, *_ in C.METRICS]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        for g, m in r["generators"].items():
            w.writerow([r[c] for c in cols[:6]] + [g] + [m.get(k) for k, *_ in C.METRICS])
    return buf.getvalue()


def _intro(rows: list[dict], d: dict, cfg: DictConfig) -> str:
    n_c = sum(r["kind"] == "contrast" for r in rows)
    n_n = len(rows) - n_c
    return (f"{n_c} contrast pairs (seeds {', '.join(map(str, cfg.study.seeds))}) and {n_n} seed-null pairs of study "
            f"{cfg.study.name}, diffed at epoch(s) {', '.join(sorted({str(r['epoch']) for r in rows}))}. Per pair, "
            f"each generator's metrics as in its summary.md: acceptance on the held-out verification split (margin "
            f"α = {d['alpha']}), accuracy and frequency averaged over its distinct hypotheses, interestingness and "
            "abstraction (1-5, by rule) and seed consistency (the share of the contrast's other seed pairs where a "
            "hypothesis also holds) over its accepted ones. Mean [95% t-interval] over seeds; a seed where a value "
            "is undefined (nothing accepted; seed consistency on seed-null pairs) is left out of its n.")


def run_comparison(cfg: DictConfig, d: dict, diff_runs) -> dict:
    """``d``: the checked diff config; ``diff_runs``: one pair's diff (``clipgen.diff.run.diff_runs``)."""
    t0, c0 = time.time(), time.process_time()
    pairs = plan(cfg, d)
    print(f"comparison {cfg.study.name}: {len(pairs)} pairs to diff "
          f"({sum(p['kind'] == 'null' for p in pairs)} seed-null)")
    rows = [_diff(cfg, p, diff_runs) for p in pairs]
    gens = list(d["generators"])
    out_dir = layout.diffs_root(cfg) / f"compare--{cfg.study.name}"
    key = stable_hash({"pairs": [r["key"] for r in rows], "settings": {k: d[k] for k in ("contrasts",
                       "recall_contrast", "recall_top")}, "version": 3})
    done = out_dir / "comparison.json"
    computed = sum(r["computed"] for r in rows)  # pairs diffed by this invocation
    if done.is_file() and read_json(done, "comparison record").get("key") == key:
        print(f"comparison {cfg.study.name}: up to date, nothing to do -> {out_dir / 'comparison.md'}")
        return {**read_json(done, "comparison record"), "computed_pairs": computed, "skipped": True}
    contrasts = list(dict.fromkeys(r["contrast"] for r in rows if r["kind"] == "contrast"))
    comp = {"study": str(cfg.study.name), "key": key, "generators": gens, "intro": _intro(rows, d, cfg),
            "tables": C.generator_tables(rows, gens, contrasts), "paired": C.paired_tables(rows, gens, contrasts),
            "recall": recall(rows, d, gens), "pairs": rows, "diff": pair_settings(d),
            "computed_pairs": computed,
            "seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}
    comp = clean_json(comp)
    atomic_write_text(out_dir / "comparison.md", C.markdown(comp))
    atomic_write_text(out_dir / "pairs.csv", pairs_csv(rows))
    atomic_write_json(done, comp)
    print(f"comparison {cfg.study.name}: {comp['computed_pairs']} of {len(rows)} pairs diffed now, "
          f"{comp['seconds']:.1f} s ({comp['cpu_seconds']:.1f} s CPU in this process)")
    for g, table in comp["tables"].items():
        overall = next((r for r in table if r["contrast"] == C.ALL), table[0])
        print(f"  {g}: acceptance rate {C.fmt_interval(overall['acceptance_rate'], 3)} ({overall['contrast']})")
    print(f"  -> {out_dir / 'comparison.md'}")
    return {**comp, "skipped": False}
