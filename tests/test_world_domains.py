"""The world study on every test domain (experiment=world_domains): the preset's grid, its report's Fig. 2 across
test domains with the paper's paired differences (clipgen.report.domains) on hand-made numbers and end to end on
the tiny world, and the probe's source x target transfer matrix (clipgen.world.probe)."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_cfg

from clipgen.facts import DOMAINS
from clipgen.recipes.grid import run_dir_of, study_runs
from clipgen.stats import paired_differences, t_interval

MATCH = ["task", "test_domain", "model_name", "settings"]


def test_preset_is_world_study_on_every_test_domain(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=world_domains")
    names = [run_dir_of(sub).name for _, sub in study_runs(cfg)]
    assert len(names) == len(set(names)) == 105  # natural-only once per seed, shared by the five domains
    assert sum(n.startswith("lso-real-only--") for n in names) == 5
    # sketch's 25 runs are world_study's own run directories: a root that ran world_study trains only 80 more
    sketch = make_cfg(tmp_path, "experiment=world_study")
    assert {run_dir_of(sub).name for _, sub in study_runs(sketch)} <= set(names)
    assert cfg.study.name == "world-study-domains" and cfg.trainer.epochs == sketch.trainer.epochs == 16


def _final(values: dict) -> pd.DataFrame:
    """A final-epoch long table from {(domain, kind): [value per seed]}."""
    rid = {"natural_only": "lso-real-only", "cg_low": "low", "cg_high": "high", "lod": "lod",
           "cg_high_pseudo": "pseudo"}
    rows = [{"run": f"{rid[k]}-{d}-{s}", "task": f"domainnet-{d}", "test_domain": d, "model_name": "m",
             "settings": "", "recipe_kind": k, "recipe_id": rid[k], "seed": s, "epoch": 16,
             "metric": f"{d}-lso-ood", "value": v}
            for (d, k), vals in values.items() for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_domain_table_markdown_and_figure_by_hand(tmp_path):
    from clipgen.report import domains as D
    from clipgen.report.figures import fig2_domains

    values = {("clipart", "natural_only"): [0.1, 0.3, 0.2], ("clipart", "lod"): [0.4, 0.5, 0.5],
              ("clipart", "cg_low"): [0.2, 0.2, 0.3], ("clipart", "cg_high"): [0.3, 0.1, 0.35],
              ("sketch", "natural_only"): [0.1, 0.2, 0.0], ("sketch", "lod"): [0.3, 0.2]}
    final = _final(values)
    paired = paired_differences(final, "clipart-lso-ood", MATCH)
    paired = pd.concat([paired, paired_differences(final, "sketch-lso-ood", MATCH)], ignore_index=True)
    conc = pd.DataFrame({"run": ["lso-real-only-sketch-2"], "test_domain": ["sketch"], "collapse": [True]})
    table = D.domain_table(final, paired, conc, ["sketch", "clipart"])

    rec = table[table["row"] == "recipe"]
    assert list(rec["test_domain"].drop_duplicates()) == ["clipart", "sketch"]  # TEST_DOMAINS order
    assert list(rec.loc[rec["test_domain"] == "clipart", "kind_a"]) == ["natural_only", "cg_low", "cg_high", "lod"]
    lod = rec[(rec["test_domain"] == "clipart") & (rec["kind_a"] == "lod")].iloc[0]
    ci = t_interval([0.4, 0.5, 0.5], 0, 1)
    assert lod["n"] == 3 and lod["mean"] == pytest.approx(ci["mean"])
    assert lod["ci95_low"] == pytest.approx(ci["ci95_low"])
    nat = rec[(rec["test_domain"] == "sketch") & (rec["kind_a"] == "natural_only")].iloc[0]
    assert nat["collapsed"] == 1  # seed 2's run is flagged, in sketch only

    diff = table[table["row"] == "difference"]
    # clipart: LOD - natural-only = +0.3, +0.2, +0.3: separated; CG-high - CG-low = +0.1, -0.1, +0.05: not
    dg = diff[(diff["test_domain"] == "clipart") & (diff["kind_a"] == "lod")].iloc[0]
    d = np.array([0.3, 0.2, 0.3])
    assert dg["mean"] == pytest.approx(d.mean())
    assert dg["ci95_low"] == pytest.approx(d.mean() - 4.3027 * d.std(ddof=1) / math.sqrt(3))
    assert (dg["verdict"], dg["n_better"]) == ("A > B", 3)
    cg = diff[(diff["test_domain"] == "clipart") & (diff["kind_a"] == "cg_high") & (diff["kind_b"] == "cg_low")]
    assert cg.iloc[0]["verdict"] == "not separated" and cg.iloc[0]["n_better"] == 2
    sk = diff[diff["test_domain"] == "sketch"].iloc[0]  # seed 2 has no LOD run: 2 pairs
    assert (sk["kind_a"], sk["n"], sk["seeds"]) == ("lod", 2, "0 1")
    assert set(diff["kind_b"] + ">" + diff["kind_a"]) <= {"natural_only>lod", "cg_low>cg_high", "lod>cg_high",
                                                          "cg_high>cg_high_pseudo"}  # the paper's four only

    md = D.markdown(table)
    assert f"**+{d.mean():.3f} [+{dg['ci95_low']:.3f}, +{dg['ci95_high']:.3f}]** (3/3)" in md  # bold: separated
    assert "| sketch |" in md and "1 collapse" in md and "(n=2)" in md
    page = D.section(table, None, tmp_path)
    assert "<b>+0.267" in page and "Across test domains" in page
    png = fig2_domains(table, {"clipart": 1 / 30, "sketch": 1 / 30}, tmp_path / "fig.png")
    assert png.is_file() and png.stat().st_size > 10_000


@pytest.mark.slow
def test_world_domains_end_to_end_on_the_tiny_world(tiny_root, tmp_path, one_torch_thread):
    """The preset on the tiny world, two test domains x natural-only and LOD x two seeds (6 runs): the report has
    the across-domain figure and tables, its numbers are the runs' results paired by seed, and a relaunch trains
    and evaluates nothing. In this process (study.parallel=1): two pool workers would each import torch first,
    which costs more CPU than these runs."""
    from clipgen.launch.study import run_study

    shutil.copytree(tiny_root / "world", tmp_path / "world")
    over = ["experiment=world_domains", "debug=smoke", "study.test_domains=[clipart,sketch]",
            "study.recipes=[natural_only,lod]", "study.seeds=[0,1]", "study.parallel=1"]
    out = run_study(make_cfg(tmp_path, *over))
    assert out["trained"] == 6 and len(out["runs"]) == 6
    report = tmp_path / "reports" / "world-study-domains"
    with open(report / "domains.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["test_domain"], r["row"], r["kind_a"]) for r in rows} == {
        (d, row, k) for d in ("clipart", "sketch") for row, k in (("recipe", "natural_only"), ("recipe", "lod"),
                                                                  ("difference", "lod"))}

    def final(run, d):
        lines = [json.loads(x) for x in (tmp_path / "runs" / run / "eval" / "results.jsonl").read_text().splitlines()]
        return max((r for r in lines if r["task"] == f"domainnet-{d}"), key=lambda r: r["epoch"])["metrics"]

    runs = {(Path(r).name.split("--")[0], Path(r).name[-1]): Path(r).name for r in out["runs"]}  # (recipe, seed)
    for d, lod in (("clipart", "lso-ipqrs-noclipartclasses"), ("sketch", "lso-cipqr-nosketchclasses")):
        diffs = [final(runs[(lod, s)], d)[f"{d}-lso-ood"] - final(runs[("lso-real-only", s)], d)[f"{d}-lso-ood"]
                 for s in "01"]
        row = next(r for r in rows if r["test_domain"] == d and r["row"] == "difference")
        assert int(row["n"]) == 2 and float(row["mean"]) == pytest.approx(np.mean(diffs))
    page = (report / "index.html").read_text()
    assert "Across test domains" in page and (report / "figures" / "fig2_domains.png").is_file()
    assert "| clipart |" in (report / "domains.md").read_text()
    again = run_study(make_cfg(tmp_path, *over))
    assert again["trained"] == 0 and again["evaluated"] == 0


def test_transfer_matrix_on_the_tiny_world(tmp_path):
    """One probe per source on its train split, each seeing as many images per class (so a small domain trains
    more epochs), tested on every domain; a source's share of its own accuracy is 1."""
    from clipgen.world.generate import split_sizes
    from clipgen.world.probe import DOMAINNET_TRANSFER_DEIT_S, compare_with_domainnet, format_matrix, transfer_matrix

    cfg = make_cfg(tmp_path, "debug=smoke")
    [r] = transfer_matrix(cfg, sources=("real", "sketch"), seeds=(0,), seen_per_class=36, test_per_class=3)
    sizes = split_sizes(cfg)
    assert r["train_per_class"] == {"real": sizes["real"]["train"], "sketch": sizes["sketch"]["train"]} == {
        "real": 18, "sketch": 10}
    assert r["epochs"] == {"real": 2, "sketch": 4}  # 36 images seen per class: 18 x 2, 10 x 4 (rounded)
    assert list(r["accuracy"]) == ["real", "sketch"] and all(list(a) == list(DOMAINS) for a in r["accuracy"].values())
    for source in ("real", "sketch"):
        acc = r["accuracy"][source]
        assert all(0 <= v <= 1 for v in acc.values())
        if acc[source] > r["chance"]:
            assert r["relative"][source][source] == pytest.approx(1.0)
    text = format_matrix([r])
    assert "rows: trained on, columns: tested on" in text and text.count("\nsketch") == 3
    assert "Spearman rho" in text and "over 10 source -> target accuracies" in text
    # DomainNet's own numbers order themselves perfectly: rho 1, its best source into sketch is clipart
    own = {s: {t: (v or 0.0) / 100 for t, v in zip(DOMAINS, row)} for s, row in DOMAINNET_TRANSFER_DEIT_S.items()}
    cmp = compare_with_domainnet(own)
    assert cmp["spearman_rho"] == pytest.approx(1.0) and cmp["pairs"] == 30
    assert cmp["best_sources"]["sketch"]["world"][0] == "clipart"
    assert not any(tmp_path.iterdir())  # the probe draws in memory and writes nothing
