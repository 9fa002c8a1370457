"""Against a real single-node SLURM cluster (slurm/testing/slurm-up.sh; `.ci/run` starts and stops it). When no
cluster runs and one cannot be started here (not root, no apt), every test is skipped with the reason.

- a 2-run tiny sweep through Hydra's submitit_slurm launcher (our slurm_cpu preset);
- the sbatch templates: recipe.sbatch builds the recipe, train.sbatch trains, a job of the higher-priority
  partition preempts it mid-run, SLURM requeues it, it resumes from latest.pt and ends with the weights of an
  uninterrupted run and one W&B run id; eval.sbatch evaluates it;
- a world study with study.launcher=slurm, and its relaunch, which submits nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_name_of

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
SMALL = ["-p", "debug", "-c", "1", "--mem=3G", "--gpus-per-task=0"]  # the templates' GPU-node defaults, scaled


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if _cluster_up():
        yield "running"
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no SLURM cluster is running and this user cannot start one (needs root and apt-get): "
                    "start one with slurm/testing/slurm-up.sh")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SLURM_TEST_DIR": str(state)}
    up = subprocess.run(["bash", str(REPO / "slurm/testing/slurm-up.sh")], env=env, capture_output=True, text=True,
                        timeout=900)
    if up.returncode != 0 or not _cluster_up():
        subprocess.run(["bash", str(REPO / "slurm/testing/slurm-down.sh")], env=env, capture_output=True)
        pytest.skip(f"the SLURM test cluster could not start: {(up.stdout + up.stderr)[-800:]}")
    yield "started"
    subprocess.run(["bash", str(REPO / "slurm/testing/slurm-down.sh")], env=env, capture_output=True, timeout=120)


def _root(tiny_root, dest: Path) -> Path:
    shutil.copytree(Path(tiny_root) / "world", dest / "world")
    return dest


def _sbatch(args: list[str], cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=ENV, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True)
    for part in out.stdout.split():
        if part.startswith("JobState="):
            return part.split("=", 1)[1]
    return "UNKNOWN"


def _wait(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_hydra_submitit_sweep_of_two_runs(slurm_cluster, tiny_root, tmp_path):
    root = _root(tiny_root, tmp_path)
    out = subprocess.run(["clipgen-train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug",
                          "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=60",
                          "debug=smoke", f"paths.root={root}", "trainer.seed=0,1"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for seed in (0, 1):
        name = run_name_of(root, "lso-cipqrs-nosketchclasses", "debug=smoke", f"trainer.seed={seed}")
        meta = json.loads((root / "runs" / name / "meta.json").read_text())
        assert meta["status"] == "finished" and meta["seed"] == seed
    subdirs = sorted(p.name for p in (root / "logs" / "clipgen-train" / "multirun").iterdir() if p.is_dir()
                     and not p.name.startswith("."))
    assert subdirs == ["debug=smoke,trainer.seed=0", "debug=smoke,trainer.seed=1"]  # named from the overrides
    assert list((root / "logs" / "clipgen-train" / "multirun" / ".submitit").glob("*/*_log.out"))
    assert "sweep: 2 jobs" in out.stdout and out.stdout.count("  done") == 2  # the job table, from SLURM jobs too


@pytest.mark.slow
def test_templates_and_preemption_requeue_resume(slurm_cluster, tiny_root, tmp_path):
    from clipgen.train.loop import run_train

    root = _root(tiny_root, tmp_path)
    # latest.pt every 3 steps (where the requeued job resumes), epoch checkpoints every 4 epochs (what eval reads)
    over = ["debug=smoke", f"paths.root={root}", "trainer.epochs=16", "trainer.save_every_steps=3",
            "trainer.save_every_epochs=4"]
    # recipe.sbatch builds the recipe on a CPU node
    job = _sbatch([*SMALL, "--wait", "-o", str(tmp_path / "recipe-%j.out"), str(REPO / "slurm/recipe.sbatch"),
                   *over], tmp_path)
    assert "recipe lso-cipqrs-nosketchclasses" in (tmp_path / f"recipe-{job}.out").read_text()
    # train.sbatch, preempted by a job of partition 'urgent' that needs the whole node
    job = _sbatch([*SMALL, "-o", str(tmp_path / "train-%j.out"), str(REPO / "slurm/train.sbatch"), *over,
                   "run_name=pre", "logger=wandb", "logger.mode=offline"], tmp_path)
    meta_path = root / "runs" / "pre" / "meta.json"

    def step():
        try:
            return json.loads(meta_path.read_text()).get("step", 0)
        except (OSError, ValueError):
            return 0
    _wait(lambda: step() >= 6, 300, "the training job to pass step 6")
    urgent = _sbatch(["-p", "urgent", "-c", str(os.cpu_count()), "--mem=1G", "-o", str(tmp_path / "urgent-%j.out"),
                      "--wrap", "sleep 4"], tmp_path)
    _wait(lambda: json.loads(meta_path.read_text()).get("status") == "finished", 600, "the requeued job to finish",
          poll=1.0)
    _wait(lambda: _job_state(job) == "COMPLETED", 120, "the training job to complete")
    log = (tmp_path / f"train-{job}.out").read_text()
    assert "received SIGUSR1" in log and "resuming pre at step" in log, log[-3000:]
    assert _job_state(urgent) in ("COMPLETED", "UNKNOWN")

    reference = run_train(make_cfg(root, *over, "run_name=ref", "logger=none"))
    for name in ("checkpoints/epoch_016.pt", "checkpoints/epoch_008.pt", "checkpoints/epoch_000.pt"):
        a = torch.load(Path(reference["run_dir"]) / name, weights_only=True)["state_dict"]
        b = torch.load(root / "runs" / "pre" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit, across the preemption
    runs = [p.name for p in (root / "runs" / "pre" / "wandb").glob("offline-run-*")]
    wandb_id = json.loads(meta_path.read_text())["wandb_id"]
    assert len(runs) >= 2 and all(r.endswith(wandb_id) for r in runs)  # one W&B run across the requeue

    # eval.sbatch evaluates every checkpoint of the run
    job = _sbatch([*SMALL, "--wait", "-o", str(tmp_path / "eval-%j.out"), str(REPO / "slurm/eval.sbatch"), *over,
                   f"eval.run_dir={root / 'runs' / 'pre'}"], tmp_path)
    lines = (root / "runs" / "pre" / "eval" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 4, 8, 12, 16]


@pytest.mark.slow
def test_world_study_on_slurm_and_relaunch_submits_nothing(slurm_cluster, tiny_root, tmp_path):
    root = _root(tiny_root, tmp_path)
    over = [f"paths.root={root}", "debug=smoke", "study.name=cluster", "study.recipes=[cg_high,lod]",
            "study.launcher=slurm"]
    for stage in ("train", "eval"):
        over += [f"study.slurm.{stage}.partition=debug", f"study.slurm.{stage}.tasks_per_node=1",
                 f"study.slurm.{stage}.gpus_per_node=0", f"study.slurm.{stage}.cpus_per_task=1",
                 f"study.slurm.{stage}.mem_gb=3", f"study.slurm.{stage}.timeout_min=60"]
    out = subprocess.run(["clipgen-study", *over], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "submitted 2 train jobs" in out.stdout and "submitted 2 eval jobs" in out.stdout
    assert out.stdout.count("finished  done") == 2 and (root / "reports" / "cluster" / "index.html").is_file()
    again = subprocess.run(["clipgen-study", *over], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted" not in again.stdout and "train (0 of 2 runs" in again.stdout
