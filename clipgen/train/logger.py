"""Experiment loggers: W&B (offline by default: no key, no network) and a no-op stand-in with the same methods.

The W&B run id is derived from the run directory, and stored in ``latest.pt`` / ``meta.json``, so a requeued or
resumed run appends to the same W&B run (``resume="allow"``) instead of starting a new one. Offline runs are
written under ``{run_dir}/wandb/``; upload them later with ``wandb sync {run_dir}/wandb/offline-run-*``.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen.errors import ClipgenError

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


class NullLogger:
    """``logger.backend=none``: accepts everything, writes nothing."""

    id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, run):
        self.run = run
        self.id = run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def stable_run_id(run_dir: str | Path) -> str:
    """16 hex characters from the run directory's absolute path: the same run always gets the same id."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:16]


def check_logger_config(cfg: DictConfig) -> None:
    if cfg.logger.backend not in BACKENDS:
        raise ClipgenError(f"unknown logger.backend {cfg.logger.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.logger.backend == "wandb" and cfg.logger.mode not in MODES:
        raise ClipgenError(f"unknown logger.mode {cfg.logger.mode!r}: expected one of {', '.join(MODES)}")


def make_logger(cfg: DictConfig, run_dir: str | Path, run_name: str, run_id: str | None = None,
                extra_config: dict | None = None) -> NullLogger | WandbLogger:
    """A started logger for this run. ``run_id`` (from a resumed ``latest.pt``) wins over the derived one, so a
    run directory that was moved still continues its W&B run. Call ``finish()`` in a ``finally``."""
    check_logger_config(cfg)
    if cfg.logger.backend == "none":
        return NullLogger()
    os.environ.setdefault("WANDB_SILENT", "true")  # keep W&B's banner out of the training log
    import wandb

    config = OmegaConf.to_container(cfg, resolve=True)
    config.update(extra_config or {})
    group = cfg.logger.group or OmegaConf.select(cfg, "study.name", default=None)
    try:
        # name: the run without its seed, so the seeds of one configuration line up in W&B's grouping
        run = wandb.init(project=cfg.logger.project, group=group, name=re.sub(r"--seed\d+$", "", run_name),
                         id=run_id or stable_run_id(run_dir), resume="allow", dir=str(run_dir), mode=cfg.logger.mode,
                         job_type="train", config=config, tags=list(cfg.logger.get("tags") or []) or None)
    except Exception as e:  # W&B raises its own error types (auth, network); report them as one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClipgenError(f"wandb.init failed with logger.mode={cfg.logger.mode!r} ({msg}): use "
                           "logger.mode=offline (no key or network needed) or logger=none") from None
    return WandbLogger(run)
