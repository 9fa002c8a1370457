"""Evaluation metrics into the training run's W&B run (``logger.backend=wandb``; nothing with ``logger=none``).

Keys are ``eval/<task>/<metric>`` (e.g. ``eval/domainnet-sketch/sketch-lso-ood``) against the custom x-axis
``eval/epoch`` (``wandb.define_metric("eval/*", step_metric="eval/epoch")``), so W&B charts them over
checkpoints, not over training steps. The run is the training run: the same id (``meta.json["wandb_id"]``, else
the id clipgen-train derives from the run directory), ``resume="allow"``, ``dir`` = the run directory, mode
from ``logger.mode`` (offline by default).

W&B only accepts a history step at or after the run's last one, and an offline or later-synced segment does
not know where training stopped, so the full evaluation of epoch e is logged at step ``total_steps + 1 + e``:
past every training step and increasing with the epoch, so a resumed evaluation continues in order. The cheap
evaluation during training (clipgen.eval.during_training) logs at the training step from inside the trainer.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("clipgen.eval")

EPOCH_KEY = "eval/epoch"


def eval_keys(task: str, metrics: dict) -> dict:
    """``{"eval/<task>/<metric>": value}`` of the numeric metrics (NaN kept: W&B shows a gap)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{task}/{key}"] = float(value) if isinstance(value, float) else int(value)
    return out


def define_eval_axis(run) -> None:
    """Make ``eval/epoch`` the x-axis of every ``eval/*`` key of a W&B run."""
    run.define_metric(EPOCH_KEY)
    run.define_metric("eval/*", step_metric=EPOCH_KEY)


class EvalTracker:
    """Opens the training run's W&B run at the first :meth:`log` (an evaluation with nothing new to log leaves
    W&B alone); use as a context manager, which finishes the run."""

    def __init__(self, cfg: DictConfig, run_dir: Path, meta: dict):
        from clipgen.wandb_run import check_logger_config, stable_run_id, train_identity

        check_logger_config(cfg)
        self.enabled = cfg.logger.backend == "wandb"
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_id = meta.get("wandb_id") or stable_run_id(run_dir)
        # The training run's own name, group, job_type and tags (meta.json), so evaluating never renames it;
        # a run trained without W&B gets what its training would have had.
        self.ident = meta.get("wandb") or train_identity(cfg, meta.get("run_name") or self.run_dir.name)
        self.base_step = int(meta.get("total_steps") or meta.get("step") or 0) + 1
        self.meta = meta
        self.run = None

    def _start(self):
        from clipgen.wandb_run import open_run, run_config_from_meta

        # the training segments' config (config.yaml + meta.json), so the segment W&B keeps has it too
        config = run_config_from_meta(self.run_dir, self.cfg, self.meta)
        self.run = open_run(self.cfg.logger.mode, self.run_dir, self.run_id, self.ident, config)
        define_eval_axis(self.run)

    def log(self, epoch: int, by_task: dict[str, dict]) -> None:
        """One history row per checkpoint: ``eval/epoch`` plus every task's metrics."""
        if not self.enabled:
            return
        if self.run is None:
            self._start()
        row = {EPOCH_KEY: int(epoch)}
        for task, metrics in by_task.items():
            row.update(eval_keys(task, metrics))
        self.run.log(row, step=self.base_step + int(epoch))

    def finish(self) -> None:
        if self.run is not None:
            import wandb

            self.run = None
            wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False
