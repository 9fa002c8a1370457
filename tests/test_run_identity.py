"""Runs identified by their settings (clipgen.rundir): sweeps over any key run every job, a relaunched study with
a changed setting trains new runs and leaves the old ones alone, the report averages only over seeds, and W&B
names every run one way before and after a resume and an evaluation."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import pytest
from conftest import make_cfg, run_name_of

from clipgen import rundir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
RID = "lso-cipqrs-nosketchclasses"  # cg_high for sketch: the default recipe


def _root(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "world", tmp_path / "world")  # the session's tiny world, not regenerated
    return tmp_path


def _cli(*args, cwd):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


# --- names -------------------------------------------------------------------------------------------------
def test_names_follow_settings_and_seeds_share_everything_else(tmp_path):
    base = run_name_of(tmp_path, RID)
    assert base == f"{RID}--clipgen-tiny-rn--seed0"  # the defaults: no settings part
    assert run_name_of(tmp_path, RID, "optim.lr=5e-4") == f"{RID}--clipgen-tiny-rn--lr0.0005--seed0"
    assert run_name_of(tmp_path, RID, "optim.lr=5e-4", "trainer.epochs=3") == \
        f"{RID}--clipgen-tiny-rn--ep3-lr0.0005--seed0"
    # a setting without a short name still makes a distinct (hashed) name; each value its own
    b2 = [run_name_of(tmp_path, RID, f"optim.beta2={v}") for v in (0.98, 0.99)]
    assert b2[0] != b2[1] and all("--x" in n for n in b2)
    # the seed is the only part seeds do not share
    s1 = run_name_of(tmp_path, RID, "optim.lr=5e-4", "trainer.seed=1")
    assert rundir.seedless(s1) == rundir.seedless(run_name_of(tmp_path, RID, "optim.lr=5e-4")) and s1.endswith("seed1")
    # data the recipe id does not spell: another held-out set or world is another run
    assert run_name_of(tmp_path, RID, "recipe.caption_seed=7") != base
    assert run_name_of(tmp_path, RID, "world=tiny") != base
    # settings that do not change the result do not rename the run
    assert run_name_of(tmp_path, RID, "trainer.threads=1", "data.workers=0", "trainer.log_every=3") == base
    # the supervised baseline's own defaults are its defaults
    assert run_name_of(tmp_path, RID, "trainer=supervised") == f"{RID}--clipgen-tiny-rn-supervised--seed0"


def test_run_of_the_earlier_layout_is_still_resumed(tmp_path):
    """A run directory named {recipe}--{model}--seed{n} by the earlier layout, with the same settings, is found
    by the new name's lookup; one with other settings is not."""
    cfg = make_cfg(tmp_path, "optim.lr=5e-4")
    old = tmp_path / "runs" / f"{RID}--clipgen-tiny-rn--seed0"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"train_spec": rundir.train_spec(cfg)}))
    assert rundir.run_dir(cfg, RID) == old
    assert rundir.run_dir(make_cfg(tmp_path, "optim.lr=2e-4"), RID).name == \
        f"{RID}--clipgen-tiny-rn--lr0.0002--seed0"


# --- sweeps ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lr_sweep_gives_three_runs_and_three_report_rows(tiny_root, tmp_path):
    root = _root(tiny_root, tmp_path)
    over = ["-m", "debug=smoke", f"paths.root={root}", "optim.lr=1e-3,5e-4,2e-4"]
    out = _cli("clipgen-train", *over, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "sweep: 3 jobs" in out.stdout and out.stdout.count("  done") == 3
    names = {run_name_of(root, RID, "debug=smoke", f"optim.lr={lr}") for lr in ("1e-3", "5e-4", "2e-4")}
    assert {p.name for p in (root / "runs").iterdir()} == names
    assert all(json.loads((root / "runs" / n / "meta.json").read_text())["status"] == "finished" for n in names)
    ev = _cli("clipgen-eval", *over, cwd=tmp_path)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-3000:]
    rep = _cli("clipgen-report", "debug=smoke", f"paths.root={root}", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    with open(root / "report" / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "sketch-lso-ood"]
    assert len(rows) == 3 and all(r["n"] == "1" and r["seeds"] == "0" for r in rows)  # never folded as seeds
    assert {r["settings"] for r in rows} == {rundir.settings_of(json.loads((root / "runs" / n / "meta.json")
                                                                           .read_text())) for n in names}
    assert len({r["settings"] for r in rows}) == 3 and sum("lr" in r["settings"] for r in rows) == 2  # 1e-3: default
    page = (root / "report" / "index.html").read_text()
    assert all(r["settings"] in page for r in rows)


def test_sweep_with_a_failing_job_finishes_the_others_and_exits_non_zero(tiny_root, tmp_path):
    root = _root(tiny_root, tmp_path)
    out = _cli("clipgen-train", "-m", "debug=smoke", f"paths.root={root}", "trainer.max_steps=2",
               "recipe.test_domain=real,sketch", cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("sweep: 2 jobs"):]
    failed = next(line for line in table.splitlines() if "recipe.test_domain=real" in line)
    assert "failed" in failed and "error.log" in failed and "invalid recipe.test_domain 'real'" in failed
    log = failed.split()[3]
    assert "invalid recipe.test_domain 'real'" in open(log).read()
    assert any("recipe.test_domain=sketch" in line and "  done" in line for line in table.splitlines())
    run = root / "runs" / run_name_of(root, RID, "debug=smoke")
    assert json.loads((run / "meta.json").read_text())["step"] == 2  # the job after the failure ran
    assert "1 of 2 sweep jobs failed" in out.stderr


# --- a study relaunched with a changed setting -----------------------------------------------------------------
@pytest.mark.slow
def test_study_relaunch_with_changed_setting_trains_new_runs_and_keeps_old(tiny_root, tmp_path):
    from clipgen.launch.study import run_study

    root = _root(tiny_root, tmp_path)
    over = ["debug=smoke", "study.name=relaunch", "study.recipes=[cg_low]"]
    first = run_study(make_cfg(root, *over))
    old = root / "runs" / run_name_of(root, "lso-rs-nosketchclasses", "debug=smoke")
    assert first["runs"] == [str(old)]
    before = {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()}
    changed = [*over, "trainer.epochs=3", "optim.lr=3e-4"]
    dry = run_study(make_cfg(root, *changed, "study.dry_run=true"))
    assert dry["to_train"] == 1
    second = run_study(make_cfg(root, *changed))
    new = root / "runs" / run_name_of(root, "lso-rs-nosketchclasses", "debug=smoke", "trainer.epochs=3",
                                      "optim.lr=3e-4")
    assert second["runs"] == [str(new)] and second["trained"] == 1 and new != old
    meta = json.loads((new / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["epochs"] == 3 and meta["identity"]["train_spec"]["optim.lr"] == 3e-4
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()} == before  # untouched
    # the study's own report shows its runs only; a relaunch with nothing new leaves it as it is
    page = (root / "reports" / "relaunch" / "index.html").read_text()
    assert new.name in page and old.name not in page
    mtime = (root / "reports" / "relaunch" / "index.html").stat().st_mtime_ns
    third = run_study(make_cfg(root, *changed))
    assert third["trained"] == third["evaluated"] == 0
    assert (root / "reports" / "relaunch" / "index.html").stat().st_mtime_ns == mtime


# --- W&B -----------------------------------------------------------------------------------------------------
def test_wandb_name_group_and_job_type_are_one_scheme_through_resume_and_eval(tiny_root, tmp_path):
    from wandb_records import read_offline_run

    from clipgen.eval.run import run_eval
    from clipgen.train.loop import run_train

    root = _root(tiny_root, tmp_path)
    over = ["debug=smoke", "logger=wandb", "logger.mode=offline", "optim.lr=5e-4", "trainer.seed=1"]
    run_train(make_cfg(root, *over, "trainer.max_steps=4"))  # stopped early, then resumed
    out = run_train(make_cfg(root, *over))
    run_eval(make_cfg(root, *over))
    runs = read_offline_run(out["run_dir"])["runs"]
    assert len(runs) >= 3  # train, resumed train, eval segments
    name = rundir.seedless(os.path.basename(out["run_dir"]))
    assert {(r["id"], r["name"], r["group"], r["job_type"]) for r in runs} == \
        {(runs[0]["id"], name, "adhoc", "train")}
    # every segment (train, resumed train, eval) opens the run with the same config, the eval one included
    configs = [{k: v for k, v in r["config"].items() if k != "_wandb"} for r in runs]
    assert [r["job_type"] for r in runs] == ["train"] * len(runs) and all(c == configs[0] for c in configs)
    meta = json.loads((tmp_path / "runs" / os.path.basename(out["run_dir"]) / "meta.json").read_text())
    assert configs[0]["config_name"] == name and configs[0]["run_name"] == os.path.basename(out["run_dir"])
    assert configs[0]["optim"]["lr"] == 5e-4 and configs[0]["identity"] == meta["identity"]
    assert {k: configs[0][k] for k in ("manifest_sha256", "git_sha", "recipe_dir", "world_size")} == \
        {k: meta[k] for k in ("manifest_sha256", "git_sha", "recipe_dir", "world_size")}
    assert meta["wandb"]["name"] == name and meta["identity"]["settings"] == name.split("--")[-1]
    assert "lr0.0005" in name
