"""One training session's state and its named pieces: ``setup`` (model, data, optimizer, schedule),
``resume`` (from latest.pt, or start: config.yaml and the untrained epoch_000.pt) and the saves (epoch
checkpoint, latest.pt, meta.json). clipgen.train.loop strings them together.

Only rank 0 writes; on the other ranks the saves do nothing, so callers need not ask.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.models.checkpoint import unwrap
from clipgen.train import checkpoint as ckpt
from clipgen.train import dist
from clipgen.train.data import EpochLoader, bad_samples_report
from clipgen.train.device import autocast
from clipgen.train.logger import NullLogger
from clipgen.train.objective import Objective, objective_for
from clipgen.train.optim import make_optimizer, schedule
from clipgen.train.stream import make_loader
from clipgen.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Target:
    """What run_train resolved before training: the config, the processes, the recipe and the run directory."""

    cfg: DictConfig
    denv: dist.DistEnv
    device: torch.device
    model_cfg: dict
    recipe_dir: Path
    manifest: dict
    manifest_sha: str
    run_dir: Path
    spec: dict  # rundir.train_spec(cfg): what a resume must agree on
    t_call: float

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Session:
    """What setup built, and where training stands (the counters latest.pt saves)."""

    target: Target
    objective: Objective
    model: torch.nn.Module
    tokenizer: object
    data: object  # TrainData or StreamData
    loader: EpochLoader  # or its subclass StreamLoader
    loader_kind: str
    optimizer: torch.optim.Optimizer
    lr_fn: Callable[[int], float]
    scaler: torch.amp.GradScaler | None
    step: int = 0
    samples_seen: int = 0
    start_epoch: int = 0  # where this process starts: the saved loader position
    start_batch: int = 0
    last_loss: float | None = None
    wandb_id: str | None = None
    prior_seconds: float = 0.0  # train_seconds of the earlier segments of a resumed run
    logger: object = field(default_factory=NullLogger)
    git_sha: str | None = None
    identity: dict | None = None  # rundir.identity(cfg), for meta.json
    t_segment: float = field(default_factory=time.time)

    @property
    def epochs(self) -> int:
        return int(self.target.cfg.trainer.epochs)

    @property
    def total(self) -> int:
        return self.epochs * self.loader.steps_per_epoch

    @property
    def main(self) -> bool:
        return self.target.denv.is_main

    def autocast(self):
        return autocast(self.target.cfg.trainer.precision, self.target.device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def train_seconds(self) -> float:
        return self.prior_seconds + time.time() - self.t_segment


def _load_data(t: Target, tokenizer):
    """``(loader kind, data, loader)``: the recipe + base corpus in memory, or streamed from the shards."""
    kind, data, loader = make_loader(t.cfg, t.recipe_dir, t.manifest, tokenizer, device=t.device,
                                     rank=t.denv.rank, world_size=t.denv.world_size)
    if data.bad_samples:
        log.warning("skipped %d bad samples (data.on_bad_sample=skip), first: %s", data.num_skipped,
                    data.bad_samples[0])
    return kind, data, loader


def setup(t: Target) -> Session:
    """Build the objective's model (seeded, so epoch_000 is a function of trainer.seed alone), the data and
    loader, the optimizer, the schedule and the loss scaler."""
    cfg, tc = t.cfg, t.cfg.trainer
    objective = objective_for(tc.objective, t.denv.rank, t.denv.world_size)
    torch.manual_seed(int(tc.seed))
    model, tokenizer = objective.create_model(cfg.model.name, cfg.model.image_px)
    if tokenizer is None:  # the loaders tokenize captions whatever the objective
        import open_clip

        tokenizer = open_clip.get_tokenizer(cfg.model.name)
    if tc.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(t.device)
    loader_kind, data, loader = _load_data(t, tokenizer)
    objective.prepare_data(data, t.recipe_dir)
    spe = loader.steps_per_epoch
    return Session(target=t, objective=objective, model=model, tokenizer=tokenizer, data=data, loader=loader,
                   loader_kind=loader_kind, optimizer=make_optimizer(model, cfg.optim),
                   lr_fn=schedule(cfg.optim, spe, int(tc.epochs) * spe),
                   scaler=torch.amp.GradScaler("cuda") if tc.precision == "amp" else None)


def _check_latest(s: Session, latest: dict) -> None:
    t, where = s.target, str(ckpt.latest_path(s.target.run_dir))
    if (latest.get("train_spec", t.spec) != t.spec or latest.get("manifest_sha256", t.manifest_sha) != t.manifest_sha
            or latest.get("model_cfg", t.model_cfg) != t.model_cfg):  # e.g. saved before the compact vocabulary
        raise ClipgenError(f"{where!r} belongs to a run with other settings or data: pick another run_name=... or "
                           "paths.root=...")
    if latest.get("num_samples", len(s.data)) != len(s.data):  # e.g. another number of bad samples skipped now
        raise ClipgenError(f"{where!r} was saved with {latest['num_samples']} training samples, the recipe now "
                           f"gives {len(s.data)}: expected the same samples to resume")


def resume(s: Session) -> None:
    """Continue from latest.pt (model, optimizer, scaler, RNG, loader position, counters), or start the run:
    config.yaml and the untrained epoch_000.pt."""
    t = s.target
    t.run_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt.load_latest(t.run_dir)
    if latest is None:
        if s.main:
            atomic_write_text(rundir.config_path(t.run_dir), OmegaConf.to_yaml(t.cfg, resolve=True))
            save_epoch(s, 0)
        return
    _check_latest(s, latest)
    unwrap(s.model).load_state_dict(latest["state_dict"])
    if latest.get("optimizer") is not None:
        s.optimizer.load_state_dict(latest["optimizer"])
    elif int(latest["position"]["epoch"]) < s.epochs:
        raise ClipgenError(f"{str(ckpt.latest_path(t.run_dir))!r} holds the end of a finished schedule (no optimizer "
                           f"state) but the run is at epoch {latest['position']['epoch']} of {s.epochs}: "
                           "pick another run_name=... or paths.root=...")
    if s.scaler is not None and latest.get("scaler"):
        s.scaler.load_state_dict(latest["scaler"])
    ckpt.set_rng_state(latest["rng"])
    s.step, s.samples_seen = int(latest["step"]), int(latest["samples_seen"])
    s.start_epoch, s.start_batch = int(latest["position"]["epoch"]), int(latest["position"]["batch"])
    s.wandb_id, s.prior_seconds = latest.get("wandb_id"), float(latest.get("train_seconds", 0.0))
    s.last_loss = latest.get("last_loss")
    log.info("resuming %s at step %d/%d (epoch %d, batch %d)", t.name, s.step, s.total, s.start_epoch,
             s.start_batch)


def _payload(s: Session, epoch: int) -> dict:
    t = s.target
    return s.objective.payload(s.model, model_name=t.cfg.model.name, model_cfg=t.model_cfg, epoch=epoch,
                               step=s.step, samples_seen=s.samples_seen, run_name=t.name,
                               recipe_id=t.manifest["recipe_id"], seed=int(t.cfg.trainer.seed))


def save_epoch(s: Session, epoch: int) -> None:
    """``checkpoints/epoch_NNN.pt`` of the model as it is now."""
    if s.main:
        ckpt.save_epoch(s.target.run_dir, _payload(s, epoch), str(s.target.cfg.trainer.checkpoint_dtype))


def save_latest(s: Session, position: dict) -> None:
    """latest.pt (everything a resume at ``position``, the next batch to train on, needs), then meta.json. At the
    end of the schedule nothing is left to resume, so the optimizer state is not kept (clipgen/FORMATS.md)."""
    if not s.main:
        return
    t = s.target
    done = int(position["epoch"]) >= s.epochs
    ckpt.save_latest(t.run_dir, _payload(s, position["epoch"]), optimizer=None if done else s.optimizer,
                     scaler=None if done else s.scaler,
                     position=position, extra={
                         "wandb_id": s.logger.id, "train_seconds": s.train_seconds(), "last_loss": s.last_loss,
                         "train_spec": t.spec, "manifest_sha256": t.manifest_sha,
                         "steps_per_epoch": s.loader.steps_per_epoch, "total_steps": s.total,
                         "num_samples": len(s.data)})
    write_meta(s, "running")


def write_meta(s: Session, status: str) -> None:
    """meta.json (clipgen/FORMATS.md), with ``status`` "running" or "finished"."""
    if not s.main:
        return
    t, tc, m = s.target, s.target.cfg.trainer, s.target.manifest
    rundir.write_meta(t.run_dir, {
        "run_name": t.name, "recipe_id": m["recipe_id"], "recipe_kind": m.get("kind"),
        "recipe_dir": str(t.recipe_dir), "manifest_sha256": t.manifest_sha, "test_domain": m.get("test_domain"),
        "heldout_classes": m.get("heldout_classes"), "classes": m.get("classes"),
        "seed": int(tc.seed), "model_name": t.cfg.model.name, "model_cfg": t.model_cfg,
        "image_px": int(t.cfg.model.image_px), "epochs": s.epochs, "batch_size": int(tc.batch_size),
        "steps_per_epoch": s.loader.steps_per_epoch, "samples_per_epoch": s.loader.samples_per_epoch,
        "total_steps": s.total, "status": status, "step": s.step, "samples_seen": s.samples_seen,
        "git_sha": s.git_sha, "wandb_id": s.logger.id, "train_seconds": s.train_seconds(),
        "final_loss": s.last_loss, "train_spec": t.spec,
        "num_samples": {"recipe": s.data.num_recipe, "base": s.data.num_base},
        "bad_samples": bad_samples_report(s.data), "world_size": t.denv.world_size, "model_kind": s.objective.name,
        "identity": s.identity, "wandb": s.logger.ident})
