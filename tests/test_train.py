"""The trainer on the tiny world: run directory contents, bitwise resume, no-op rerun, seeds, leak guard, errors,
W&B offline. Runs use their own run_name so other test files sharing ``tiny_root`` never collide with them."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from clipgen.errors import ClipgenError
from clipgen.models.factory import create_clip, register_clipgen_models
from clipgen.train import checkpoint as ckpt
from clipgen.train import session
from clipgen.train.data import EpochLoader, TrainData, load_train_data, random_resized_crop
from clipgen.wandb_run import stable_run_id
from clipgen.train.loop import run_train
from clipgen.train.optim import lr_at, param_groups

# One torch thread: on a shared 2-core machine, 2 OpenMP threads can stall badly when other jobs compete.
SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")


def _init_state(seed: int, name: str = "clipgen-tiny-rn") -> dict:
    torch.manual_seed(seed)
    model, _ = create_clip(name, 32)
    return model.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mtimes(run_dir: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(tiny_root):
    """The reference: an uninterrupted smoke run."""
    cfg = make_cfg(tiny_root, *SMOKE, "run_name=test-train-full")
    return cfg, run_train(cfg)


def test_tiny_run_writes_the_run_directory(full_run):
    cfg, out = full_run
    run_dir = Path(out["run_dir"])
    assert out["status"] == "finished" and math.isfinite(out["final_loss"]) and out["steps"] > 0
    epochs = cfg.trainer.epochs
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [f"epoch_{e:03d}.pt" for e in range(epochs + 1)]
    assert (run_dir / "latest.pt").is_file() and (run_dir / "config.yaml").is_file()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["recipe_kind"] == "cg_high" and meta["heldout_classes"]
    assert meta["step"] == meta["total_steps"] == epochs * meta["steps_per_epoch"] == out["steps"]
    assert meta["samples_per_epoch"] == meta["steps_per_epoch"] * cfg.trainer.batch_size

    first = torch.load(run_dir / "checkpoints" / "epoch_000.pt", weights_only=True)
    assert first["epoch"] == 0 and first["step"] == 0 and first["model_name"] == "clipgen-tiny-rn"
    assert _same(first["state_dict"], _init_state(cfg.trainer.seed))  # epoch 0 = the freshly seeded init
    assert not any(k.startswith("module.") for k in first["state_dict"])

    import open_clip

    last = run_dir / "checkpoints" / f"epoch_{epochs:03d}.pt"
    register_clipgen_models()
    model, _, _ = open_clip.create_model_and_transforms("clipgen-tiny-rn", pretrained=str(last))
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert _same(model.state_dict(), saved) and not _same(saved, first["state_dict"])

    # latest.pt of a finished run: the float32 weights and counters, no optimizer state (never resumed)
    latest = torch.load(run_dir / "latest.pt", weights_only=True)
    assert latest["optimizer"] is None and latest["scaler"] is None and latest["step"] == out["steps"]
    assert latest["position"] == {"epoch": epochs, "batch": 0}
    assert _same(latest["state_dict"], saved)  # smoke stores fp32 epoch checkpoints


def test_run_killed_after_its_last_save_finishes_without_training(full_run):
    """Killed between the final latest.pt and meta.json's "finished": the rerun resumes at the end, trains no
    step and marks the run finished. A latest.pt without optimizer state that is not at the end is refused."""
    cfg, out = full_run
    run_dir = Path(out["run_dir"])
    meta_path, latest_path = run_dir / "meta.json", run_dir / "latest.pt"
    meta_bytes, latest_bytes = meta_path.read_bytes(), latest_path.read_bytes()
    try:
        meta = json.loads(meta_bytes)
        meta_path.write_text(json.dumps({**meta, "status": "running"}))
        again = run_train(cfg)
        assert again["status"] == "finished" and not again.get("skipped") and again["steps"] == out["steps"]
        assert json.loads(meta_path.read_text())["status"] == "finished"
        latest = torch.load(latest_path, weights_only=True)
        meta_path.write_text(json.dumps({**meta, "status": "running"}))
        torch.save({**latest, "position": {"epoch": 0, "batch": 0}}, latest_path)
        with pytest.raises(ClipgenError, match=r"latest\.pt' holds the end of a finished schedule .* epoch 0 of"):
            run_train(cfg)
    finally:
        meta_path.write_bytes(meta_bytes)
        latest_path.write_bytes(latest_bytes)


def test_finished_run_reruns_as_a_noop(full_run):
    cfg, out = full_run
    before = _mtimes(Path(out["run_dir"]))
    again = run_train(cfg)
    assert again["status"] == "finished" and again.get("skipped") and again["steps"] == out["steps"]
    assert _mtimes(Path(out["run_dir"])) == before
    with pytest.raises(ClipgenError, match="optim.lr=0.001 .*run_name="):  # other settings, same run name
        run_train(make_cfg(cfg.paths.root, *SMOKE, "run_name=test-train-full", "optim.lr=0.01"))
    assert _mtimes(Path(out["run_dir"])) == before


def test_interrupted_and_resumed_run_is_bitwise_equal(full_run, tiny_root, tmp_path, monkeypatch):
    """Three segments in another paths.root, with W&B offline: stop by max_steps mid-epoch 1, stop by SIGUSR1
    in epoch 2, then finish. Final weights equal the uninterrupted run's bit for bit."""
    cfg_full, out_full = full_run
    shutil.copytree(Path(tiny_root) / "world", tmp_path / "world")  # same world, other root: recipe rebuilt
    over = (*SMOKE, "run_name=test-train-resumed", "logger=wandb", "logger.mode=offline")
    first = run_train(make_cfg(tmp_path, *over, "trainer.max_steps=4"))
    run_dir = Path(first["run_dir"])
    assert first["status"] == "running" and first["steps"] == 4
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "running"
    init_mtime = (run_dir / "checkpoints" / "epoch_000.pt").stat().st_mtime_ns

    spe = json.loads((run_dir / "meta.json").read_text())["steps_per_epoch"]
    stop_at = spe + 2  # in the second epoch, so the resume also crosses an epoch boundary
    orig = session.schedule

    def schedule_and_signal(*args, **kwargs):
        lr_fn = orig(*args, **kwargs)

        def lr_and_signal(step):
            if step == stop_at - 1:  # raised during step `stop_at`; handled at the step boundary after it
                os.kill(os.getpid(), signal.SIGUSR1)
            return lr_fn(step)
        return lr_and_signal

    monkeypatch.setattr(session, "schedule", schedule_and_signal)
    with pytest.raises(SystemExit) as exc:
        run_train(make_cfg(tmp_path, *over))
    assert exc.value.code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    assert torch.load(run_dir / "latest.pt", weights_only=True)["step"] == stop_at
    monkeypatch.setattr(session, "schedule", orig)

    last = run_train(make_cfg(tmp_path, *over))
    assert last["status"] == "finished" and last["steps"] == out_full["steps"]
    assert last["final_loss"] == out_full["final_loss"]
    full_dir = Path(out_full["run_dir"])
    for name in ("latest.pt", f"checkpoints/epoch_{cfg_full.trainer.epochs:03d}.pt"):
        a = torch.load(full_dir / name, weights_only=True)["state_dict"]
        b = torch.load(run_dir / name, weights_only=True)["state_dict"]
        assert _same(a, b), name
    init = torch.load(run_dir / "checkpoints" / "epoch_000.pt", weights_only=True)["state_dict"]
    assert (run_dir / "checkpoints" / "epoch_000.pt").stat().st_mtime_ns == init_mtime
    assert _same(init, _init_state(0))

    # One W&B run across the three segments: the id derived from the run dir, in latest.pt and meta.json.
    wid = stable_run_id(run_dir)
    assert json.loads((run_dir / "meta.json").read_text())["wandb_id"] == wid
    assert torch.load(run_dir / "latest.pt", weights_only=True)["wandb_id"] == wid
    runs = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
    assert len(runs) == 3 and all(wid in r for r in runs)


def test_seeds_give_distinct_and_reproducible_inits(tiny_root):
    out = run_train(make_cfg(tiny_root, *SMOKE, "trainer.seed=1", "trainer.max_steps=1", "run_name=test-train-s1"))
    init1 = torch.load(Path(out["run_dir"]) / "checkpoints" / "epoch_000.pt", weights_only=True)["state_dict"]
    assert _same(init1, _init_state(1)) and _same(_init_state(1), _init_state(1))
    assert not _same(init1, _init_state(0))


def _rewrite_first_sample(shard: Path, change) -> str:
    """Rewrite ``shard`` with ``change(meta)`` applied to its first sample's json; returns that sample id."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    first_key = members[0][0].name.split(".", 1)[0]
    sid = None
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name == f"{first_key}.json":
                meta = json.loads(data)
                change(meta)
                sid, data = meta["sample_id"], json.dumps(meta).encode()
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return sid


@pytest.fixture
def recipe_copy(full_run, tmp_path):
    """A writable copy of the smoke recipe (and its base corpus, at the same relative place)."""
    src = Path(json.loads((Path(full_run[1]["run_dir"]) / "meta.json").read_text())["recipe_dir"])
    manifest = json.loads((src / "manifest.json").read_text())
    shutil.copytree(src, tmp_path / src.name)
    base = (src / manifest["base"]["dir"]).resolve()
    shutil.copytree(base, tmp_path / base.name)
    return tmp_path / src.name, manifest


def test_leak_guard_rejects_test_split_and_heldout_classes(recipe_copy):
    rdir, manifest = recipe_copy
    _, tok = create_clip("clipgen-tiny-rn", 32)
    assert len(load_train_data(rdir, tok, 32)) == manifest["num_samples"] + manifest["base"]["num_samples"]
    shard = rdir / sorted(manifest["shards"])[0]
    sid = _rewrite_first_sample(shard, lambda m: m.update(split="test"))
    with pytest.raises(ClipgenError, match="split 'test'") as err:
        load_train_data(rdir, tok, 32)
    assert sid in str(err.value) and shard.name in str(err.value)

    held = manifest["heldout_classes"][0]
    sid = _rewrite_first_sample(shard, lambda m: m.update(  # a consistent id: the guard checks json against it
        split="train", domain=manifest["test_domain"], class_name=held,
        sample_id=f"{manifest['test_domain']}/{held.replace(' ', '_')}/x"))
    with pytest.raises(ClipgenError, match="held-out class") as err:
        load_train_data(rdir, tok, 32)
    assert sid in str(err.value)
    load_train_data(rdir, tok, 32, {**manifest, "kind": "cg_high_pseudo"})  # pseudo recipes keep them on purpose

    with pytest.raises(ClipgenError, match="expected"):
        load_train_data(rdir, tok, 32, {**manifest, "kind": "cg_high_pseudo", "num_samples": 1})
    with pytest.raises(ClipgenError, match="model.image_px"):
        load_train_data(rdir, tok, 64, {**manifest, "kind": "cg_high_pseudo"})


@pytest.mark.slow
def test_killed_streaming_run_resumes_bitwise(full_run, tiny_root, tmp_path):
    """kill -9 (no chance to save) of a run on the streaming loader with 2 DataLoader workers, at whatever step
    it has reached after its first latest.pt; the restarted run redoes the lost steps and ends with exactly the
    weights of the uninterrupted in-memory run."""
    cfg_full, out_full = full_run
    shutil.copytree(Path(tiny_root) / "world", tmp_path / "world")
    over = [*SMOKE, "run_name=test-train-killed", "data.loader=stream", "data.workers=2",
            "trainer.save_every_steps=3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(["clipgen-train", f"paths.root={tmp_path}", *over], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    latest = tmp_path / "runs" / "test-train-killed" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, mid-step
    proc.wait()
    assert latest.exists(), proc.stdout.read().decode()[-2000:]
    killed_at = torch.load(latest, weights_only=True)["step"]
    out = run_train(make_cfg(tmp_path, *over))
    assert out["status"] == "finished" and out["steps"] == out_full["steps"] > killed_at
    last = f"checkpoints/epoch_{cfg_full.trainer.epochs:03d}.pt"
    a = torch.load(Path(out_full["run_dir"]) / last, weights_only=True)["state_dict"]
    assert _same(a, torch.load(Path(out["run_dir"]) / last, weights_only=True)["state_dict"])
    assert "stream loader" in proc.stdout.read().decode()


@pytest.mark.parametrize("override, message", [
    ("data.loader=disk", "unknown data.loader"),
    ("trainer.precision=amp", "bf16 or fp32"),
    ("model.name=no-such-model", "unknown model.name"),
    ("trainer.precision=fp8", "unknown trainer.precision"),
])
def test_bad_settings_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ClipgenError, match=message):
        run_train(make_cfg(tmp_path, *SMOKE, "trainer.device=cpu", override))
    assert not (tmp_path / "runs").exists()


def test_nan_loss_raises_and_saves_nothing(tiny_root, monkeypatch):
    from open_clip.loss import ClipLoss

    monkeypatch.setattr(ClipLoss, "forward", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(ClipgenError, match="step 1 .*last good checkpoint"):
        run_train(make_cfg(tiny_root, *SMOKE, "run_name=test-train-nan"))
    run_dir = Path(tiny_root) / "runs" / "test-train-nan"
    assert not (run_dir / "latest.pt").exists()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "running"
    (run_dir / "meta.json").write_text(json.dumps({**meta, "manifest_sha256": "0" * 64}))
    with pytest.raises(ClipgenError, match="different recipe.*run_name="):  # other data under the same name
        run_train(make_cfg(tiny_root, *SMOKE, "run_name=test-train-nan"))


def test_loader_order_and_augmentation_are_resumable():
    n = 50
    data = TrainData(images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8),
                     tokens=torch.arange(n).view(n, 1), meta={}, num_recipe=40, num_base=10)
    loader = EpochLoader(data, batch_size=16, seed=0, image_px=8)
    assert loader.steps_per_epoch == 3 and loader.samples_per_epoch == 48
    full = list(loader.batches(1))
    resumed = list(EpochLoader(data, 16, 0, 8).batches(1, start=2))
    assert torch.equal(full[2].images, resumed[0].images) and torch.equal(full[2].tokens, resumed[0].tokens)
    assert not torch.equal(loader.permutation(0), loader.permutation(1))
    seen = torch.cat([b.tokens.view(-1) for b in full])
    assert len(set(seen.tolist())) == 48  # one permutation: no sample twice in an epoch
    x = data.images[:4].float() / 255
    same = random_resized_crop(x, 8, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(same, x, atol=1e-6)  # a full-image crop is the identity


def test_optimizer_groups_and_schedule():
    torch.manual_seed(0)
    model, _ = create_clip("clipgen-tiny-rn", 32)
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in [names[id(p)] for p in no_decay["params"]]
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1) and lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0) and lr_at(100, 1.0, 10, 100) == pytest.approx(0.0)
    assert math.log(1 / 0.07) == pytest.approx(model.logit_scale.item())
    assert ckpt.epoch_path("r", 3).name == "epoch_003.pt"


def test_eval_during_training_leaves_training_bitwise_equal(full_run, tiny_root):
    """eval.during_training=true with W&B offline, interrupted by max_steps after the first epoch's subset
    evaluation and resumed: the same weights and loss as the plain uninterrupted run, ``eval/*-subset`` keys in the
    training run's W&B run, and nothing in eval/results.jsonl."""
    from wandb_records import read_offline_run

    cfg_full, out_full = full_run
    full_dir = Path(out_full["run_dir"])
    spe = json.loads((full_dir / "meta.json").read_text())["steps_per_epoch"]
    over = (*SMOKE, "run_name=test-train-subset-eval", "eval.during_training=true", "eval.subset_per_class=3",
            "logger=wandb", "logger.mode=offline")
    first = run_train(make_cfg(tiny_root, *over, f"trainer.max_steps={spe + 1}"))
    assert first["status"] == "running" and first["steps"] == spe + 1
    last = run_train(make_cfg(tiny_root, *over))
    assert last["status"] == "finished" and last["final_loss"] == out_full["final_loss"]
    run_dir = Path(last["run_dir"])
    for name in ("latest.pt", *(f"checkpoints/epoch_{e:03d}.pt" for e in range(cfg_full.trainer.epochs + 1))):
        a = torch.load(full_dir / name, weights_only=True)["state_dict"]
        b = torch.load(run_dir / name, weights_only=True)["state_dict"]
        assert _same(a, b), name
    assert not (run_dir / "eval").exists()

    got = read_offline_run(run_dir)
    assert set(got["run_ids"]) == {stable_run_id(run_dir)} and ("eval/*", "eval/epoch") in got["metrics"]
    rows = [h for h in got["history"] if "eval/epoch" in h]
    assert [h["eval/epoch"] for h in rows] == list(range(1, cfg_full.trainer.epochs + 1))
    assert [h["_step"] for h in rows] == [spe * e for e in range(1, cfg_full.trainer.epochs + 1)]
    d = cfg_full.recipe.test_domain
    for h in rows:
        assert 0.0 <= h[f"eval/domainnet-{d}-subset/{d}-lso-ood"] <= 1.0
        assert 0 < h[f"eval/domainnet-{d}-subset/{d}-n-ood"] <= 3 * len(cfg_full.heldout.classes)


def test_subset_evaluator_leaves_rng_mode_and_weights_alone(full_run):
    import random

    import numpy as np

    from clipgen.eval.during_training import SubsetEvaluator

    cfg, out = full_run
    meta = json.loads((Path(out["run_dir"]) / "meta.json").read_text())
    manifest = json.loads((Path(meta["recipe_dir"]) / "manifest.json").read_text())
    torch.manual_seed(3)
    model, tok = create_clip("clipgen-tiny-rn", 32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    ev = SubsetEvaluator(make_cfg(cfg.paths.root, *SMOKE, "eval.subset_per_class=2"), manifest, tok, 32)
    by_task = ev(model, epoch=1, step=0)
    d = manifest["test_domain"]
    m = by_task[f"domainnet-{d}"]
    assert m[f"{d}-n-ood"] + m[f"{d}-n-id"] <= 2 * len(manifest["classes"])
    assert model.training and _same(model.state_dict(), before)  # BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_rng))
    again = ev(model, epoch=2, step=0)  # same weights, same fixed subset: same numbers
    assert again.keys() == by_task.keys()
    assert all(again[t] == pytest.approx(by_task[t], nan_ok=True) for t in by_task)
    with pytest.raises(ClipgenError, match="eval.subset_per_class=0"):
        SubsetEvaluator(make_cfg(cfg.paths.root, *SMOKE, "eval.subset_per_class=0"), manifest, tok, 32)
