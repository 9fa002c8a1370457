"""The vertical slice end to end on the tiny world, through the console script a user types."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_cfg
from clipgen.recipes.build import ensure_recipe


@pytest.mark.slow
def test_study_end_to_end_on_tiny_world(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(["clipgen-study", "debug=smoke", f"paths.root={tmp_path}", "study.parallel=2",
                          "study.name=slice"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "report: " in out.stdout and "total" in out.stdout  # time table and report path printed
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name.split("--")[0] for r in runs] == sorted(
        ["lso-real-only", "lso-rs-nosketchclasses", "lso-cipqrs-nosketchclasses", "lso-cipqr-nosketchclasses"])
    for run in runs:
        ckpts = sorted((run / "checkpoints").glob("epoch_*.pt"))
        assert [c.name for c in ckpts] == ["epoch_000.pt", "epoch_001.pt", "epoch_002.pt"]
        lines = [json.loads(x) for x in (run / "eval" / "results.jsonl").read_text().splitlines()]
        sketch = [r for r in lines if r["task"] == "domainnet-sketch"]
        assert [r["epoch"] for r in sketch] == [0, 1, 2]  # one line per checkpoint
        for r in sketch:
            for key in ("sketch-lso-ood", "sketch-lso-id", "real-lso-ood", "real-lso-id"):
                assert math.isfinite(r["metrics"][key]) and 0.0 <= r["metrics"][key] <= 1.0
            assert r["checkpoint_sha256"] and r["recipe_id"] == run.name.split("--")[0]
        assert (run / "eval" / "outputs" / "epoch_002.npz").is_file()
    index = tmp_path / "reports" / "slice" / "index.html"  # the study's own report
    assert index.is_file() and "fig2_sketch.png" in index.read_text()
    assert (index.parent / "figures" / "fig2_sketch.png").is_file()

    # relaunching the finished study redoes nothing: no checkpoint or result is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/**/*") if p.is_file()
              and "wandb" not in p.parts and not p.name.startswith(".")}  # lock files are not work
    again = subprocess.run(["clipgen-study", "debug=smoke", f"paths.root={tmp_path}", "study.name=slice"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    changed = [p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert not changed, changed


@pytest.mark.slow
def test_open_clip_trainer_reads_recipe_shards(tiny_root, tmp_path):
    """open_clip's own trainer trains a few steps on a recipe's shards (the interoperability promise)."""
    recipe = ensure_recipe(make_cfg(tiny_root, "debug=smoke", "recipe=cg_high"))
    sizes = json.loads((recipe / "sizes.json").read_text())
    n = len(sizes)
    shards = f"{recipe}/shard-{{00000..{n - 1:05d}}}.tar"
    steps = 4  # a few steps prove the shards train; open_clip reads only the samples an epoch of these needs
    assert sum(sizes.values()) >= steps * 16
    code = ("import sys; from clipgen.models.factory import register_clipgen_models; register_clipgen_models(); "
            "from open_clip_train.main import main; main(sys.argv[1:])")
    logs = tmp_path / "oc_logs"
    out = subprocess.run([sys.executable, "-c", code, "--train-data", shards, "--dataset-type", "webdataset",
                          "--train-num-samples", str(steps * 16), "--model", "clipgen-tiny-rn",
                          "--batch-size", "16", "--epochs", "1", "--workers", "1", "--device", "cpu",
                          "--precision", "fp32", "--logs", str(logs), "--name", "oc", "--lr", "1e-3",
                          "--warmup", "2", "--save-frequency", "1", "--report-to", ""],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (Path(logs) / "oc" / "checkpoints" / "epoch_1.pt").is_file()
    assert "Train Epoch: 0" in out.stdout + out.stderr
