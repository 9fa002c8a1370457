"""Experiment loggers: W&B (offline by default: no key, no network) and a no-op stand-in with the same methods.

The W&B run id is derived from the run directory, and stored in ``latest.pt`` / ``meta.json``, so a requeued or
resumed run appends to the same W&B run (``resume="allow"``) instead of starting a new one. Offline runs are
written under ``{run_dir}/wandb/``; upload them later with ``wandb sync {run_dir}/wandb/offline-run-*``.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipgen.wandb_run import check_logger_config, open_run, stable_run_id, train_identity


class NullLogger:
    """``logger.backend=none``: accepts everything, writes nothing."""

    id: str | None = None
    ident: dict | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, run, ident: dict):
        self.run = run
        self.id = run.id
        self.ident = ident

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: DictConfig, run_dir: str | Path, run_name: str, run_id: str | None = None,
                extra_config: dict | None = None) -> NullLogger | WandbLogger:
    """A started logger for this run (clipgen.wandb_run names it). ``run_id`` (from a resumed ``latest.pt``) wins
    over the derived one, so a run directory that was moved still continues its W&B run. ``extra_config``: the
    keyword arguments of :func:`clipgen.wandb_run.run_config` (identity, manifest_sha256, git_sha, recipe_dir,
    world_size), so the evaluation's segments carry the same config. Call ``finish()`` in a ``finally``."""
    check_logger_config(cfg)
    if cfg.logger.backend == "none":
        return NullLogger()
    from clipgen.rundir import read_meta
    from clipgen.wandb_run import run_config

    config = run_config(run_dir, cfg, run_name, **(extra_config or {}))
    # A resumed run keeps the W&B identity it started with (meta.json), whoever resumes it.
    ident = (read_meta(run_dir) or {}).get("wandb") or train_identity(cfg, run_name)
    run = open_run(cfg.logger.mode, run_dir, run_id or stable_run_id(run_dir), ident, config)
    return WandbLogger(run, ident)
