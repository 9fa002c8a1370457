"""Distributed training on CPU (gloo): torchrun and SLURM-style (srun environment) launches give one DDP run whose
weights match a single process at the same global batch; rank 0 alone writes the run directory."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, scratch_dir

from clipgen.errors import ClipgenError
from clipgen.train import dist
from clipgen.train.loop import run_train

# ViT: LayerNorm only, so per-rank batch statistics cannot differ from the single process (SyncBatchNorm, which
# ResNets would need for that, has no CPU implementation).
OVER = ("debug=smoke", "recipe=cg_high", "model=tiny_vit", "trainer.threads=1", "run_name=ddp")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _root(tiny_root, dest: Path) -> Path:
    shutil.copytree(Path(tiny_root) / "world", dest / "world")  # the same world: no regeneration
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(root: Path, name: str) -> dict:
    return torch.load(root / "runs" / "ddp" / name, weights_only=True)


@pytest.fixture(scope="module")
def single(tiny_root, tmp_path_factory):
    """The single-process reference, trained here: the function clipgen-train calls, without a second torch start."""
    with scratch_dir(tmp_path_factory, "one") as scratch:
        root = _root(tiny_root, scratch)
        assert run_train(make_cfg(root, *OVER))["status"] == "finished"
        yield root


@pytest.mark.slow
def test_torchrun_two_process_gloo_matches_one_process(single, tiny_root, tmp_path):
    root = _root(tiny_root, tmp_path)
    out = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "--no-python", "clipgen-train",
                          f"paths.root={root}", *OVER], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("clipgen: ddp finished") == 1  # rank 0 alone reports
    meta = json.loads((root / "runs" / "ddp" / "meta.json").read_text())
    one = json.loads((single / "runs" / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2 and one["world_size"] == 1
    assert meta["step"] == one["step"] and meta["samples_seen"] == one["samples_seen"]
    assert abs(meta["final_loss"] - one["final_loss"]) < 1e-4
    a = _state(single, "checkpoints/epoch_000.pt")["state_dict"]
    b = _state(root, "checkpoints/epoch_000.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same init
    b = _state(root, "checkpoints/epoch_002.pt")["state_dict"]
    assert not any(k.startswith("module.") for k in b)
    init, one_final, two_final = (_outputs(r / "runs" / "ddp" / "checkpoints" / n) for r, n in
                                  ((single, "epoch_000.pt"), (single, "epoch_002.pt"), (root, "epoch_002.pt")))
    gap = max(float((x - y).abs().max()) for x, y in zip(one_final, two_final))
    moved = max(float((x - y).abs().max()) for x, y in zip(one_final, init))
    assert gap < 1e-4 and moved > 1000 * gap, (gap, moved)  # the same model, up to summation order


def _outputs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of a fixed batch. Weights are not compared directly: Adam turns
    gradients that are zero up to rounding (an attention key bias cannot change a softmax) into full-size steps
    of either sign, so such weights differ between any two summation orders without changing the model."""
    import open_clip

    from clipgen.models.factory import register_clipgen_models

    register_clipgen_models()
    model, _, _ = open_clip.create_model_and_transforms("clipgen-tiny-vit", pretrained=str(path))
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = open_clip.get_tokenizer("clipgen-tiny-vit")([f"a sketch of a {c}" for c in ("cat", "bus", "axe")])
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.slow
def test_srun_environment_gives_ddp_and_resumes(single, tiny_root, tmp_path):
    """Two tasks as srun starts them (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID): stopped after 3 steps,
    then resumed as a single process to the end, matching the single-process run."""
    root = _root(tiny_root, tmp_path)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**ENV, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(["clipgen-train", f"paths.root={root}", *OVER, "trainer.max_steps=3"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    latest = _state(root, "latest.pt")
    assert latest["step"] == 3 and json.loads((root / "runs" / "ddp" / "meta.json").read_text())["world_size"] == 2
    assert run_train(make_cfg(root, *OVER))["status"] == "finished"  # resumed here, a single process
    gap = max(float((x - y).abs().max()) for x, y in zip(
        _outputs(single / "runs" / "ddp" / "checkpoints" / "epoch_002.pt"),
        _outputs(root / "runs" / "ddp" / "checkpoints" / "epoch_002.pt")))
    assert gap < 1e-4, gap


def test_detect_reads_torchrun_and_srun_environments():
    assert dist.detect({}) == dist.DistEnv()
    assert dist.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == dist.DistEnv(3, 4, 1, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert dist.detect(srun) == dist.DistEnv(5, 8, 1, "slurm")
    # the batch script of a --ntasks=8 job is one process, not rank 0 of 8
    assert dist.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == dist.DistEnv()
    assert dist._first_host("gpu[03-05,07],cpu1") == "gpu03"
    with pytest.raises(ClipgenError, match="RANK='x'"):
        dist.detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_batch_that_does_not_split_over_ranks_fails_first(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ClipgenError, match=r"batch_size=32 .* 3 processes \(torchrun\).*multiple of 3"):
        run_train(make_cfg(tmp_path, *OVER))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "recipes").exists()
