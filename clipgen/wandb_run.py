"""One W&B opener for every stage, and one naming scheme (README "W&B").

Every W&B run clipgen writes is named the same way before and after a resume, a requeue or an evaluation:

- training run (evaluation appends to it): ``name`` = the run name without ``--seed{n}`` (the seeds of one
  configuration share it), ``group`` = ``logger.group``, else the study's name for runs a study launched, else
  ``adhoc``; ``job_type`` = ``train``; ``tags`` = ``logger.tags``; ``config`` (:func:`run_config`) = the run's
  composed config as written to its ``config.yaml`` at the start, plus ``identity`` (clipgen.rundir: train_spec,
  data, settings), ``run_name``, ``config_name`` (the seedless name: group by it to average seeds),
  ``manifest_sha256``, ``git_sha`` (of the training code), ``recipe_dir`` and ``world_size``. The id is stable
  (the run directory's), recorded in ``meta.json``; every segment (the first training one, each resumed one,
  each evaluation) opens the run with this same config, the evaluation's read back from ``config.yaml`` and
  ``meta.json``, so a synced run has it whichever segment W&B saw last.
- report run: one per report directory (a study's report: ``reports/{study}``), stable id, ``job_type`` =
  ``report``, ``name`` = ``report-{study}``.
- diff run: one per diff directory, ``job_type`` = ``diff``.

Offline by default (no key, no network): files land under the run's directory in ``wandb/``; ``wandb sync``
uploads them later.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig

from clipgen.errors import ClipgenError

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")
ADHOC_GROUP = "adhoc"


def check_logger_config(cfg: DictConfig) -> None:
    if cfg.logger.backend not in BACKENDS:
        raise ClipgenError(f"unknown logger.backend {cfg.logger.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.logger.backend == "wandb" and cfg.logger.mode not in MODES:
        raise ClipgenError(f"unknown logger.mode {cfg.logger.mode!r}: expected one of {', '.join(MODES)}")


def stable_run_id(path: str | Path) -> str:
    """16 hex characters from a directory's absolute path: the same run (report, diff) always gets the same id."""
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:16]


def group_of(cfg: DictConfig) -> str:
    """``logger.group``, else ``adhoc`` (a study sets ``logger.group`` to its name for the runs it launches)."""
    return str(cfg.logger.group) if cfg.logger.get("group") else ADHOC_GROUP


def train_identity(cfg: DictConfig, run_name: str) -> dict:
    """The W&B settings of a training run (also used by its evaluation, from meta.json)."""
    from clipgen.rundir import seedless

    return {"project": str(cfg.logger.project), "group": group_of(cfg), "name": seedless(run_name),
            "job_type": "train", "tags": [str(t) for t in (cfg.logger.get("tags") or [])]}


def run_config(run_dir: str | Path, cfg: DictConfig, run_name: str, *, identity: dict | None,
               manifest_sha256: str | None, git_sha: str | None, recipe_dir: str | None,
               world_size: int | None) -> dict:
    """The W&B config of a training run's every segment (module docstring). ``config.yaml`` when the run wrote
    it (a resume with other threads or workers leaves the config as it started), else ``cfg``."""
    from omegaconf import OmegaConf

    from clipgen.rundir import config_path, seedless

    saved = config_path(run_dir)
    config = OmegaConf.to_container(OmegaConf.load(saved) if saved.is_file() else cfg, resolve=True)
    config.update({"manifest_sha256": manifest_sha256, "git_sha": git_sha, "recipe_dir": recipe_dir,
                   "world_size": world_size, "identity": identity, "run_name": run_name,
                   "config_name": seedless(run_name)})
    return config


def run_config_from_meta(run_dir: str | Path, cfg: DictConfig, meta: dict) -> dict:
    """:func:`run_config` as the training wrote it, from the run's ``meta.json`` (for its evaluation)."""
    return run_config(run_dir, cfg, meta.get("run_name") or Path(run_dir).name, identity=meta.get("identity"),
                      manifest_sha256=meta.get("manifest_sha256"), git_sha=meta.get("git_sha"),
                      recipe_dir=meta.get("recipe_dir"), world_size=meta.get("world_size"))


def open_run(mode: str, run_dir: str | Path, run_id: str, ident: dict, config: dict | None = None):
    """``wandb.init`` with ``resume="allow"`` and the given identity; W&B's own errors become one line."""
    os.environ.setdefault("WANDB_SILENT", "true")  # keep W&B's banner out of the logs
    import wandb

    try:
        # reinit: a run this process left open (a notebook, an earlier stage that raised) is finished first;
        # W&B would otherwise hand that run back and this stage's records would land in it.
        return wandb.init(project=ident["project"], group=ident.get("group"), name=ident["name"], id=run_id,
                          resume="allow", dir=str(run_dir), mode=mode, job_type=ident.get("job_type"),
                          tags=list(ident.get("tags") or []) or None, config=config, reinit="finish_previous")
    except Exception as e:  # W&B raises its own error types (auth, network); report them as one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClipgenError(f"wandb.init failed with logger.mode={mode!r} ({msg}): use logger.mode=offline (no key "
                           "or network needed) or logger=none") from None
