"""The HTML report over evaluated fake runs: CSV aggregates checked by hand, every referenced figure exists,
text is escaped, W&B offline works, and (where Chromium is installed) the page renders headless."""
from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS

from conftest import make_cfg, scratch_dir

try:
    from test_eval import FAKE_CLASSES, FAKE_HELDOUT, make_fake_run, write_fake_domainnet
except ImportError:  # tests/ imported as a package
    from tests.test_eval import FAKE_CLASSES, FAKE_HELDOUT, make_fake_run, write_fake_domainnet

CHROMIUM = next((c for c in ("/usr/bin/chromium", "chromium", "chromium-browser") if shutil.which(c)), None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_synthetic_run(root, name, kind, recipe_id, seed, value, manifest_domains, allow_p=None):
    """A run that only has meta.json and results.jsonl (no checkpoints): enough for the report's readers."""
    run_dir = root / "runs" / name
    (run_dir / "eval").mkdir(parents=True)
    recipe_dir = root / "recipes" / f"{recipe_id}-x"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    spec = {"allow_p": allow_p, "allow_base": "cg_high"} if allow_p is not None else {}
    (recipe_dir / "manifest.json").write_text(json.dumps({"domains": manifest_domains, "spec": spec}))
    meta = {"run_name": name, "recipe_id": recipe_id, "recipe_kind": kind, "recipe_dir": str(recipe_dir),
            "manifest_sha256": "cd" * 32, "test_domain": "sketch", "heldout_classes": FAKE_HELDOUT,
            "classes": FAKE_CLASSES, "seed": seed, "model_name": "clipgen-tiny-rn", "git_sha": "feed"}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    lines = [{"task": "domainnet-sketch", "epoch": e, "test_domain": "sketch", "git_sha": "feed",
              "metrics": {"sketch-lso-ood": value * e, "sketch-lso-id": 0.5, "real-lso-ood": None}}
             for e in (0, 1)]
    (run_dir / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _recipe_files(run_dir, kind, domains):
    """manifest.json and sizes.json of a fake run's recipe: 2 images per class and domain, the held-out classes
    removed from sketch unless the recipe is a pseudo upper bound (FORMATS.md)."""
    counts = {d: {c: 0 if d == "sketch" and c in FAKE_HELDOUT and not kind.endswith("_pseudo") else 2
                  for c in FAKE_CLASSES} for d in domains}
    n = sum(sum(v.values()) for v in counts.values())
    recipe_dir = Path(json.loads((run_dir / "meta.json").read_text())["recipe_dir"])
    (recipe_dir / "manifest.json").write_text(json.dumps({
        "kind": kind, "domains": domains, "heldout_classes": FAKE_HELDOUT, "counts": counts, "num_samples": n,
        "base": {"dir": "../base-x", "num_samples": 7, "shards": {}}}))
    (recipe_dir / "sizes.json").write_text(json.dumps({"shard-00000.tar": n - 1, "shard-00001.tar": 1}))


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "study") as root:
        yield _study_runs(root)


def _study_runs(root):
    """Five evaluated fake runs (CG-low and CG-high x seeds 0/1, natural-only seed 0) plus results-only
    interpolation and allow-p runs."""
    from clipgen.eval.run import run_eval

    data = write_fake_domainnet(root / "domainnet")
    for kind, doms in (("cg_low", ["real", "sketch"]), ("cg_high", DOMAINS)):
        for seed in (0, 1):
            cfg, run_dir = make_fake_run(root, data, kind=kind, seed=seed, epochs=2)
            _recipe_files(run_dir, kind, list(doms))
            run_eval(cfg)
    cfg, run_dir = make_fake_run(root, data, kind="natural_only", seed=0, epochs=2)
    _recipe_files(run_dir, "natural_only", ["real"])
    run_eval(cfg)
    doms = ["clipart", "quickdraw", "real", "sketch"]
    _write_synthetic_run(root, "interp", "interpolation", "lso-cqrs-nosketchclasses", 0, 0.3, doms)
    _write_synthetic_run(root, "allow", "allow", "lso-ciqprs-nosketchclasses-allow0.2", 0, 0.4,
                         ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"], allow_p=0.2)
    return root


@pytest.fixture(scope="module")
def report(study_root):
    from clipgen.report.build import run_report

    return run_report(make_cfg(study_root, "debug=smoke", "study.name='<b>fake & study</b>'"))


def _results(root, run_name):
    return [json.loads(x) for x in (root / "runs" / run_name / "eval" / "results.jsonl").read_text().splitlines()]


SMOKE_CG_LOW = "lso-rs-nosketchclasses--clipgen-tiny-rn--ep2-bs32-wu5--seed{}"  # names carry non-default settings


def _summary(report):
    with open(report["summary"], newline="") as f:
        return list(csv.DictReader(f))


def test_report_renders_and_every_figure_exists(study_root, report):
    index = study_root / "report" / "index.html"
    assert report["report"] == str(index) and report["runs"] == 7
    page = index.read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("figures/") and (index.parent / s).is_file() for s in srcs)
    names = {p.split("/")[-1] for p in report["figures"]}
    assert {"fig2_sketch.png", "curves_sketch.png", "fig3_extra_domains_sketch.png",
            "fig13_allow_sketch.png"} <= names
    # natural-only runs are evaluated on every test domain, but only designed test domains get a section
    assert "fig2_clipart.png" not in names and "Test domain: quickdraw" not in page
    assert "&lt;b&gt;fake &amp; study&lt;/b&gt;" in page and "<b>fake" not in page
    assert SMOKE_CG_LOW.format(1) in page and "deadbeef" in page


def test_summary_aggregates_two_seeds_by_hand(study_root, report):
    rows = _summary(report)
    vals = [_results(study_root, SMOKE_CG_LOW.format(s))[-1]["metrics"]
            for s in (0, 1)]
    a, b = vals[0]["sketch-lso-ood"], vals[1]["sketch-lso-ood"]
    mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)
    mine = [r for r in rows if r["recipe_kind"] == "cg_low" and r["task"] == "domainnet-sketch"]
    assert {r["metric"] for r in mine} == set(vals[0])  # every metric key, once, at the final epoch
    row = next(r for r in mine if r["metric"] == "sketch-lso-ood")
    assert row["epoch"] == "1" and row["n"] == "2" and row["seeds"] == "0 1"
    assert float(row["mean"]) == pytest.approx(mean)
    assert float(row["std"]) == pytest.approx(std, abs=1e-12)
    half = 12.7062 * std / math.sqrt(2)  # t_{0.975, 1}
    # the interval is clipped to the accuracy's range [0, 1]
    assert float(row["ci95_low"]) == pytest.approx(max(0.0, mean - half), abs=1e-9)
    assert float(row["ci95_high"]) == pytest.approx(min(1.0, mean + half), abs=1e-9)
    # one seed: std and interval are NaN, not 0; an all-null metric is NaN with n = 0
    nat = next(r for r in rows if r["recipe_kind"] == "natural_only" and r["metric"] == "sketch-lso-ood")
    assert nat["n"] == "1" and nat["std"] == "" and nat["ci95_low"] == ""
    empty = next(r for r in rows if r["recipe_kind"] == "interpolation" and r["metric"] == "real-lso-ood")
    assert empty["n"] == "0" and empty["mean"] == ""


def test_learning_curves_csv_has_every_epoch(study_root, report):
    with open(study_root / "report" / "learning_curves.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["recipe_kind"] == "cg_high" and r["metric"] == "sketch-lso-id"
                and r["task"] == "domainnet-sketch"]
    assert sorted(r["epoch"] for r in rows) == ["0", "1"] and all(r["n"] == "2" for r in rows)


def test_no_results_is_a_clipgen_error(tmp_path):
    from clipgen.report.build import run_report

    with pytest.raises(ClipgenError, match=r"clipgen-eval"):
        run_report(make_cfg(tmp_path, "debug=smoke"))


def test_wandb_offline_logs_the_report(study_root, tmp_path, monkeypatch):
    from clipgen.report.build import run_report

    root = tmp_path / "root"
    shutil.copytree(study_root / "runs", root / "runs")
    shutil.copytree(study_root / "recipes", root / "recipes")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = run_report(make_cfg(root, "debug=smoke", "logger=wandb", "logger.mode=offline"))
    assert out["runs"] == 7
    assert list((root / "report" / "wandb").glob("offline-run-*")), "expected an offline W&B run in report/"


def test_report_renders_in_headless_chromium(study_root, report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (/usr/bin/chromium)")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000", f"--screenshot={shot}",
         f"file://{report['report']}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000


# Measured in the page by Chromium: every table container whose content is wider than the container itself.
_OVERFLOW_PROBE = """<script>
const wide = [...document.querySelectorAll('.scroll')].filter(d => d.scrollWidth > d.clientWidth + 1)
  .map(d => d.querySelector('th') ? d.querySelector('th').textContent : '?');
document.body.setAttribute('data-probe', JSON.stringify({page: document.documentElement.scrollWidth,
  view: document.documentElement.clientWidth, wide: wide}));
</script></body>"""


def test_report_fits_a_printed_page_and_explains_the_sign_column(study_root, report, tmp_path):
    """Every table fits the width of a printed A4 landscape page (277 mm = 1047 CSS px) and of a 1280 px
    screenshot, instead of scrolling sideways out of the printout; run names, directories and hashes wrap at
    their separators; the sign-per-seed column is explained in words."""
    page = Path(report["report"]).read_text()
    assert "@page{size:A4 landscape" in page and "word-break:break-all" not in page
    assert "<i>Sign per seed</i> has one mark per seed" in page and "A higher with" in page
    runs = page[page.index("<h2>Runs</h2>"):]
    assert f"runs/<wbr>{SMOKE_CG_LOW.format(1)}<" in runs  # a directory wraps at its slashes, a name at its dashes
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (/usr/bin/chromium)")
    probe = Path(report["report"]).with_name("probe.html")
    probe.write_text(page.replace("</body>", _OVERFLOW_PROBE))
    try:
        for width in (1047, 1280):
            proc = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900", "--dump-dom",
                 f"file://{probe}"], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            got = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', proc.stdout).group(1)))
            assert got["wide"] == [] and got["page"] <= got["view"], (width, got)
    finally:
        probe.unlink()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_paired_differences_by_seed_beside_fig2(study_root, report):
    page = (study_root / "report" / "index.html").read_text()
    assert "Paired by seed: sketch-lso-ood" in page and "CG high − CG low" in page
    rows = _csv(study_root / "report" / "paired_differences.csv")
    row = next(r for r in rows if r["kind_a"] == "cg_high" and r["kind_b"] == "cg_low")
    runs = {(r["recipe_kind"], r["seed"]): r["run"] for r in _csv(study_root / "report" / "concentration.csv")}
    diffs = [_results(study_root, runs[("cg_high", str(s))])[-1]["metrics"]["sketch-lso-ood"]
             - _results(study_root, runs[("cg_low", str(s))])[-1]["metrics"]["sketch-lso-ood"] for s in (0, 1)]
    assert row["n"] == "2" and row["seeds"] == "0 1" and row["task"] == "domainnet-sketch"
    assert float(row["mean"]) == pytest.approx(np.mean(diffs))
    assert -1 <= float(row["ci95_low"]) <= float(row["ci95_high"]) <= 1
    nat = next(r for r in rows if r["kind_a"] == "cg_low" and r["kind_b"] == "natural_only")
    assert nat["n"] == "1" and nat["ci95_low"] == "" and nat["unpaired"] == "1"  # natural-only has seed 0 only
    # no interval anywhere in the summary leaves an accuracy's range
    for r in _summary(report):
        if r["ci95_low"] and not r["metric"].endswith(("-n-ood", "-n-id")):
            assert 0.0 <= float(r["ci95_low"]) <= float(r["ci95_high"]) <= 1.0


def test_prediction_concentration_from_saved_predictions(study_root, report):
    rows = _csv(study_root / "report" / "concentration.csv")
    assert len([r for r in rows if r["test_domain"] == "sketch"]) == 5  # every evaluated run, natural-only too
    r = next(r for r in rows if r["recipe_kind"] == "cg_low" and r["seed"] == "1" and r["test_domain"] == "sketch")
    with np.load(study_root / "runs" / r["run"] / "eval" / "outputs" / "epoch_001.npz") as z:
        preds = z["preds"][z["domains"].astype(str) == "sketch"]
    counts = np.bincount(preds, minlength=len(FAKE_CLASSES))
    assert r["epoch"] == "1" and r["n_images"] == str(preds.size)
    assert float(r["top_share"]) == pytest.approx(counts.max() / preds.size)
    assert r["top_class"] == FAKE_CLASSES[int(counts.argmax())]
    assert r["collapse"] == str(counts.max() / preds.size >= 0.5 and counts.max() / preds.size >= 2 / 6)
    score = _results(study_root, r["run"])[-1]["metrics"]["sketch-lso-ood"]
    assert float(r["score"]) == pytest.approx(score)  # the same score the eval wrote
    page = (study_root / "report" / "index.html").read_text()
    assert "Prediction concentration" in page
    assert (study_root / "report" / "figures" / "concentration_sketch.png").is_file()


def test_transfer_matrix_composition_and_full_runs_table(study_root, report):
    page = (study_root / "report" / "index.html").read_text()
    nat = next(r for r in _summary(report) if r["recipe_kind"] == "natural_only" and r["metric"] == "sketch-lso-ood")
    transfer = page[page.index("Natural-only transfer from real"):page.index("Test domain: sketch")]
    assert f"{float(nat['mean']):.3f} <span class=muted>(n=1)</span>" in transfer
    recipes = page[page.index("<h2 id=recipes>"):page.index("<h2>Runs</h2>")]
    # CG low: real + sketch, the 2 held-out classes removed from sketch; sizes.json total = manifest's 20
    assert "lso-rs-nosketchclasses" in recipes and "0 of 2" in recipes and "2 of 2" in recipes
    assert ">20<" in recipes and ">7<" in recipes and "≠" not in recipes
    runs = page[page.index("<h2>Runs</h2>"):]
    run_dir = study_root / "runs" / SMOKE_CG_LOW.format(1)
    runs = runs.replace("<wbr>", "")  # long names, paths and hashes carry line-break opportunities
    assert str(run_dir) in runs and "ab" * 32 in runs and "W&amp;B run id" in runs
