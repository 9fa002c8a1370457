"""Study presets and the study runner's bookkeeping: the paper grids expand to the paper's run counts and recipe
ids, natural-only runs once per seed, a dry run lists what is missing and launches nothing, a relaunch of a
finished study trains and evaluates nothing."""
from __future__ import annotations

import os
import subprocess
from collections import Counter

import pytest
from conftest import make_cfg, run_name_of

from clipgen.errors import ClipgenError
from clipgen.launch.study import run_study
from clipgen.recipes.grid import job_config, parse_recipe_entry, run_dir_of, study_runs
from clipgen.recipes.naming import recipe_spec

DATA = ("data.domainnet_root=/data/domainnet", "data.imagenet_captions_json=/data/ic.json",
        "data.imagenet_train_root=/data/imagenet/train", "data.cc_shards=/data/cc/00000.tar")


def _ids(cfg) -> list[str]:
    return [recipe_spec(sub.recipe).recipe_id for _, sub in study_runs(cfg)]


def test_paper_grid_is_the_papers_78_runs(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=paper_grid", *DATA)
    runs = study_runs(cfg)
    jobs = [job for job, _ in runs]
    assert len(jobs) == 78
    ids = Counter(recipe_spec(sub.recipe).recipe_id for _, sub in runs)
    assert ids["lso-real-only"] == 3  # natural-only: one run per seed, not one per test domain
    assert ids["lso-rs-nosketchclasses"] == ids["lso-cipqrs-nosketchclasses"] == 3
    assert ids["lso-cipqr-nosketchclasses"] == 3 and ids["lso-rs-nosketchclasses-pseudo"] == 3  # LOD, pseudo
    assert ids["lso-cr-noclipartclasses"] == 3 and ids["lso-ipqrs-noclipartclasses"] == 3
    assert len(ids) == 26 and all(n == 3 for n in ids.values())  # 25 recipes of 5 domains + natural-only
    names = {run_dir_of(sub).name for _, sub in runs}
    assert len(names) == 78 and "lso-real-only--RN50--bs1024-acc2--seed2" in names
    sub = runs[-1][1]
    assert sub == job_config(cfg, jobs[-1])  # each run's config is its job's
    assert (sub.model.name, sub.trainer.batch_size, sub.trainer.accum_steps, sub.trainer.epochs) == ("RN50", 1024, 2,
                                                                                                      32)
    assert sub.logger.group == "paper-grid" and "grid" in sub.logger.tags


@pytest.mark.parametrize("experiment, n, example", [
    ("paper_cc12m", 7, "lso-ipqrs-noclipartclasses"),
    ("paper_allow", 60, "lso-rs-nosketchclasses-allow0.05"),
    ("paper_interpolation", 18, "lso-cpqrs-noclipartclasses"),
    ("paper_aligned", 1, "lso-cipqrs-noquickdrawclasses-aligned"),
    ("paper_supervised", 16, "lso-real-only"),
    ("world_study", 25, "lso-cipqrs-nosketchclasses-pseudo"),
])
def test_other_presets(tmp_path, experiment, n, example):
    cfg = make_cfg(tmp_path, f"experiment={experiment}", *DATA)
    ids = _ids(cfg)
    assert len(ids) == n and example in ids
    if experiment == "paper_supervised":
        sub = study_runs(cfg)[0][1]
        assert sub.trainer.objective == "supervised" and sub.optim.name == "sgd"
        assert run_dir_of(sub).name == "lso-real-only--RN50-supervised--seed0"  # never a CLIP run's directory


def test_recipe_entries():
    assert parse_recipe_entry("allow:0.2:cg_low", "sketch") == {"kind": "allow", "allow_p": 0.2, "allow_base": "cg_low"}
    assert parse_recipe_entry("cg_high+aligned", "sketch") == {"kind": "cg_high", "aligned_captions": True}
    assert parse_recipe_entry("interpolation:cqrs", "sketch")["extra_domains"] == ["clipart", "quickdraw"]
    with pytest.raises(ClipgenError, match="suffix '\\+aligned'"):
        parse_recipe_entry("cg_high+shiny", "sketch")


def test_dry_run_lists_runs_and_launches_nothing(tmp_path, capsys):
    # paper_grid reads no CC shards: giving data.cc_shards to it is an error (clipgen.preflight), so not here
    out = run_study(make_cfg(tmp_path, "experiment=paper_grid", *DATA[:3], "study.dry_run=true"))
    text = capsys.readouterr().out
    assert out["to_train"] == out["to_eval"] == 78 and "nothing was launched" in text
    assert "lso-ciprs-noquickdrawclasses--RN50--bs1024-acc2--seed1" in text and "not started" in text
    assert not any(tmp_path.iterdir())  # not even a world or a log folder


def test_cfg_job_prints_the_grid(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["clipgen-study", "experiment=paper_grid", *DATA, f"paths.root={tmp_path}", "--cfg", "job"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test_domains:\n  - clipart\n  - infograph\n  - painting\n  - quickdraw\n  - sketch" in out.stdout
    assert "cg_high_pseudo" in out.stdout and "name: RN50" in out.stdout


@pytest.mark.slow
def test_world_study_on_submitit_local_then_relaunch_does_nothing(tiny_root, tmp_path):
    import shutil

    shutil.copytree(tiny_root / "world", tmp_path / "world")
    over = [f"paths.root={tmp_path}", "debug=smoke", "study.name=local-jobs", "study.recipes=[cg_high]",
            "study.launcher=submitit_local", "study.slurm.train.cpus_per_task=1", "study.slurm.eval.cpus_per_task=1",
            "study.analyze=true", "analysis=fast", "analysis.umap=false",
            "analysis.analyses=[geometry,cka]"]
    # the analyze stage as submitit jobs, with its two cheap analyses; every analysis's results are asserted in
    # test_analyze.py (SAE and circuits take ~1 CPU minute here and do not change how the stage runs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(["clipgen-study", *over], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "submitted 1 train jobs" in out.stdout and "submitted 1 eval jobs" in out.stdout
    run = tmp_path / "runs" / run_name_of(tmp_path, "lso-cipqrs-nosketchclasses", "debug=smoke")
    assert f"{run.name}  sketch       finished  done" in out.stdout
    assert list((tmp_path / "logs" / "study" / "local-jobs" / "train").glob("*/*_log.out"))  # submitit's logs
    assert "submitted 1 analyze jobs" in out.stdout
    assert sorted(p.name for p in (run / "analysis").glob("epoch_*/*.json")) == ["cka.json", "geometry.json"]
    assert "Mechanistic analyses" in (tmp_path / "reports" / "local-jobs" / "index.html").read_text()
    again = subprocess.run(["clipgen-study", *over], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted" not in again.stdout and "train (0 of 1 runs" in again.stdout and "eval (0 runs)" in again.stdout
    assert "analyze (0 runs)" in again.stdout
