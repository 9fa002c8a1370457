"""The training loop, in the spirit of nanoGPT: setup, resume, step, save; resumable bit for bit.

``run_train(cfg)`` builds (or finds) the recipe, trains a model from scratch on recipe + base corpus and writes
the run directory of clipgen/FORMATS.md. What is trained is ``trainer.objective``'s business
(clipgen.train.objective: CLIP's contrastive loss or the supervised baseline); the loop is the same for both. A
finished run is a no-op. An unfinished one resumes from ``latest.pt`` by default: model, optimizer, scaler, RNG
and loader position are restored (clipgen.train.session), and because the data order and augmentation depend
only on (seed, epoch, batch index) (see clipgen.train.data), an interrupted and resumed fp32 CPU run ends with
the same weights, bit for bit, as an uninterrupted one.

SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before preemption or the time limit) and SIGINT (Ctrl-C) set a
flag (clipgen.train.signals); at the next step boundary latest.pt is saved and the process exits with status
128 + signal number, ready to be requeued (never after Ctrl-C; a second Ctrl-C stops at once). One trainer works
in a run directory at a time (clipgen.runlock); temporary files that killed trainers left there are removed when
the next one starts.

Distributed: under torchrun or srun (clipgen.train.dist) every process trains one DDP replica on its share of
each global batch (``trainer.batch_size`` is global, so the data, the schedule and the checkpoints are those of
one process). ClipLoss computes the local rows against the gathered features (local loss + gather with grad);
rank 0 alone builds the recipe, writes checkpoints, meta.json and logs to W&B. Every step the ranks agree on the
mean loss (for the NaN check and the log) and on whether to stop (a signal reaching any rank stops all at the
same step). ``trainer.sync_bn=true`` turns BatchNorm into SyncBatchNorm (CUDA only) so that ResNets see batch
statistics of the global batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from clipgen import recipedir, rundir, runlock
from clipgen.errors import ClipgenError
from clipgen.eval.during_training import subset_evaluator
from clipgen.models.checkpoint import unwrap
from clipgen.models.export import export_checkpoint
from clipgen.models.factory import model_config
from clipgen.preflight import check_run_config, check_values
from clipgen.procs import torch_threads
from clipgen.train import checkpoint as ckpt
from clipgen.train import dist
from clipgen.train.data import check_data_config
from clipgen.train.device import autocast, resolve_device, wrap_for_training
from clipgen.train.logger import NullLogger, make_logger
from clipgen.wandb_run import check_logger_config
from clipgen.train.objective import check_objective_name, objective_for
from clipgen.train.optim import check_optim_config
from clipgen.train.session import Session, Target, resume, save_epoch, save_latest, setup, write_meta
from clipgen.train.signals import StopSignals, requeue_after_stop
from clipgen.files import sweep_temp_files
from clipgen.provenance import git_sha

log = logging.getLogger(__name__)



# --- before training: config checks, the recipe, the run directory ------------------------------------------
def _check_config(cfg: DictConfig) -> tuple[torch.device, dict]:
    """Cheap checks first, so a typo fails before the recipe is built. Returns (device, the model's config)."""
    tc = cfg.trainer
    check_values(cfg)  # every value in range (optim.lr > 0, trainer.seed >= 0, ...) before anything else
    if tc.checkpoint_dtype not in ckpt.CHECKPOINT_DTYPES:
        raise ClipgenError(f"unknown trainer.checkpoint_dtype {tc.checkpoint_dtype!r}: expected one of "
                           f"{', '.join(ckpt.CHECKPOINT_DTYPES)}")
    device = resolve_device(tc.device)
    autocast(tc.precision, device)
    check_logger_config(cfg)
    check_run_config(cfg)  # image sizes and dataset keys agree, before the recipe is built
    check_data_config(cfg.data)
    check_objective_name(tc.objective)
    check_optim_config(cfg.optim)
    objective_for(tc.objective).check(cfg)
    mcfg = model_config(cfg.model.name)
    if cfg.recipe.dry_run:
        raise ClipgenError("recipe.dry_run=true builds nothing to train on: expected recipe.dry_run=false for training")
    return device, mcfg


def _check_processes(tc, denv: dist.DistEnv, device: torch.device) -> None:
    batch = int(tc.batch_size)
    if batch % denv.world_size:
        raise ClipgenError(f"trainer.batch_size={batch} is the global batch and does not split over "
                           f"{denv.world_size} processes ({denv.launcher}): expected a multiple of {denv.world_size}")
    if tc.sync_bn and device.type != "cuda":
        raise ClipgenError("trainer.sync_bn=true needs CUDA (SyncBatchNorm has no CPU implementation): expected "
                           "trainer.sync_bn=false on CPU")
    if batch // denv.world_size % int(tc.accum_steps):
        raise ClipgenError(f"trainer.accum_steps={tc.accum_steps} does not divide the per-process batch "
                           f"{batch // denv.world_size}: expected a divisor of it")


def run_train(cfg: DictConfig) -> dict:
    """Train (or resume, or skip if finished) the run the config names. Returns ``{"run_dir", "status", "steps",
    "epochs", "final_loss", "seconds", "samples_per_s"}`` (status "finished", or "running" when stopped early by
    trainer.max_steps)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_call = time.time()
    device, mcfg = _check_config(cfg)
    denv = dist.detect()
    _check_processes(cfg.trainer, denv, device)
    device = dist.init(denv, device)
    try:
        with contextlib.ExitStack() as held:  # holds the run directory's lock, taken in _run
            return _run(cfg, denv, device, mcfg, t_call, held)
    finally:
        dist.shutdown(denv)


def _check_same_run(run_dir: Path, old: dict, spec: dict, manifest_sha: str) -> None:
    hint = "pick another run_name=... or paths.root=... (finished work is never overwritten)"
    if old.get("manifest_sha256") != manifest_sha:
        raise ClipgenError(f"run dir {str(run_dir)!r} was trained on a different recipe (manifest sha256 "
                           f"{str(old.get('manifest_sha256'))[:12]}, now {manifest_sha[:12]}): {hint}")
    diff = rundir.spec_differences(old["train_spec"], spec) if "train_spec" in old else []
    if diff:
        raise ClipgenError(f"run dir {str(run_dir)!r} was started with {', '.join(diff)}: {hint}")


def _finished(t: Target) -> dict | None:
    """The result of a run that already finished (a rerun is a no-op), or None."""
    if not rundir.is_run(t.run_dir):
        return None
    old = rundir.load_meta(t.run_dir)
    _check_same_run(t.run_dir, old, t.spec, t.manifest_sha)
    if old.get("status") != "finished":
        return None
    print(f"clipgen: {t.name} already finished ({old.get('step')} steps, {old.get('epochs')} epochs, final "
          f"loss {old.get('final_loss')}) in {t.run_dir}; nothing to do")
    return {"run_dir": str(t.run_dir), "status": "finished", "steps": old.get("step"),
            "epochs": old.get("epochs"), "final_loss": old.get("final_loss"),
            "seconds": time.time() - t.t_call, "samples_per_s": None, "skipped": True}


def _run(cfg: DictConfig, denv: dist.DistEnv, device: torch.device, mcfg: dict, t_call: float,
         held: contextlib.ExitStack) -> dict:
    from clipgen.recipes.build import ensure_recipe

    if not denv.is_main:  # rank 0 builds the recipe (and the world) once; the others then find it
        dist.barrier(denv)
    recipe_dir = Path(ensure_recipe(cfg))
    if denv.is_main:
        dist.barrier(denv)
    manifest = recipedir.read_manifest(recipe_dir)
    t = Target(cfg=cfg, denv=denv, device=device, model_cfg=mcfg, recipe_dir=recipe_dir, manifest=manifest,
               manifest_sha=recipedir.manifest_sha256(recipe_dir),
               run_dir=rundir.run_dir(cfg, manifest["recipe_id"]), spec=rundir.train_spec(cfg), t_call=t_call)
    done = _finished(t)
    if done is None and denv.is_main:  # one trainer per run directory; the kernel releases it however we end
        held.enter_context(runlock.exclusive(t.run_dir, "being trained", "one clipgen-train per run directory"))
        done = _finished(t)  # another trainer may have finished it meanwhile
        sweep_temp_files(t.run_dir, rundir.TRAINER_TEMP_FILES)  # only a trainer writes these; we hold the lock
    if done is not None:
        if denv.is_main:
            _export_last(t)  # a run finished before exports existed, or killed between finishing and exporting
        return done

    with torch_threads(int(cfg.trainer.threads)):
        return _train(t)


def _export_last(t: Target) -> None:
    """``export.after_training``: the last checkpoint of a finished CLIP run as open_clip's ``local-dir:`` folder
    ``{run}/export/epoch_NNN`` (clipgen.models.export), so open_clip and CLIP_benchmark load it without clipgen.
    A current export is left alone."""
    if not t.cfg.export.get("after_training", True) or str(t.cfg.trainer.objective) != "clip":
        return
    found = rundir.checkpoints(t.run_dir)
    if not found:
        return
    epoch, path = found[-1]
    out = export_checkpoint(path, rundir.export_dir(t.run_dir, epoch),
                            {"run": t.name, "run_dir": str(t.run_dir.resolve())})
    if out["written"]:
        log.info("%s: epoch %d exported for open_clip: local-dir:%s", t.name, epoch, out["dir"])


# --- training: setup, resume, the epochs, the report ---------------------------------------------------------
def _train(t: Target) -> dict:
    s = setup(t)
    resume(s)
    s.model = wrap_for_training(s.model, t.cfg.trainer, t.denv, t.device)
    subset_eval = subset_evaluator(t.cfg, t.manifest, s.tokenizer) if s.main else None  # eval.during_training
    _start_logging(s)
    log.info("training %s: %d samples (recipe %d + base %d, %s loader), %d epochs x %d steps of %d, device %s, %s",
             t.name, len(s.data), s.data.num_recipe, s.data.num_base, s.loader_kind, s.epochs,
             s.loader.steps_per_epoch, t.cfg.trainer.batch_size, t.device, t.cfg.trainer.precision)
    first_step, t_loop = s.step, time.time()
    stopped, previous_handler = _train_epochs(s, subset_eval)
    return _report(s, stopped, previous_handler, s.step - first_step, t_loop)


def _start_logging(s: Session) -> None:
    """The W&B logger (rank 0), continuing the run's W&B run when resuming, and this segment's clock."""
    t = s.target
    s.git_sha = git_sha()
    s.identity = rundir.identity(t.cfg)
    # the same values meta.json records, so the evaluation's W&B segments carry the same config
    s.logger = (make_logger(t.cfg, t.run_dir, t.name, run_id=s.wandb_id, extra_config={
        "identity": s.identity, "manifest_sha256": t.manifest_sha, "git_sha": s.git_sha,
        "recipe_dir": str(t.recipe_dir), "world_size": t.denv.world_size}) if s.main else NullLogger())
    s.t_segment = time.time()  # train_seconds accumulates over resumed segments


@dataclass
class _Meter:
    """Throughput and data-loading time since the last log line."""

    since: float = field(default_factory=time.time)
    steps: int = 0
    data_time: float = 0.0


def _progress_bar(s: Session):
    """A progress bar on a terminal; plain log lines every trainer.log_every steps otherwise (batch jobs, pipes)."""
    if not (s.main and s.target.cfg.trainer.progress_bar and sys.stderr.isatty() and s.step < s.total):
        return None
    from tqdm import tqdm

    return tqdm(total=s.total, initial=s.step, desc=s.target.name, unit="step", dynamic_ncols=True)


def _train_epochs(s: Session, subset_eval) -> tuple[str | None, object]:
    """Train to the end, or until a stop signal or trainer.max_steps. Returns (why it stopped or None, the
    handler the stop signal had before ours)."""
    tc = s.target.cfg.trainer
    stopped, previous_handler = None, None
    if 0 < tc.max_steps <= s.step < s.total:  # a rerun with the same max_steps has nothing left to do
        stopped = "max_steps"
    meter = _Meter()
    s.model.train()
    bar = _progress_bar(s)
    try:
        with StopSignals() as stop:
            write_meta(s, "running")
            for e in range(s.start_epoch, s.epochs):
                stopped = stopped or _train_epoch(s, e, stop, meter, bar)
                if stopped:
                    break
                _end_epoch(s, e, subset_eval)
            if stopped is None:
                write_meta(s, "finished")
            elif stopped != "max_steps":
                previous_handler = stop.previous(stopped)
    finally:
        if bar is not None:
            bar.close()
        s.logger.finish()
    return stopped, previous_handler


def _train_epoch(s: Session, e: int, stop: StopSignals, meter: _Meter, bar) -> str | None:
    """Epoch ``e`` from the saved batch (when resuming into it) on; returns why it stopped early, or None."""
    tc = s.target.cfg.trainer
    batches = s.loader.batches(e, s.start_batch if e == s.start_epoch else 0)
    while True:
        t0 = time.time()
        b = next(batches, None)
        meter.data_time += time.time() - t0
        if b is None:
            return None
        loss, stat, lr, sig = train_step(s, b, stop)
        meter.steps += 1
        if bar is not None:
            bar.update(1)
        if s.main and (s.step % tc.log_every == 0 or s.step == s.total):
            _log_step(s, b, loss, lr, stat, meter, bar)
        if sig:
            stopped = signal.Signals(int(sig)).name
        elif 0 < tc.max_steps <= s.step < s.total:
            stopped = "max_steps"
        else:
            stopped = None
        if stopped or s.step % tc.save_every_steps == 0:
            save_latest(s, {"epoch": e, "batch": b.index + 1})
        if stopped:
            return stopped


def train_step(s: Session, b, stop: StopSignals) -> tuple[float, float, float, float]:
    """One optimisation step on batch ``b``: the learning rate, the objective's forward + backward, the ranks'
    agreement on the loss and on stopping, the NaN check, the optimizer step. Returns (loss, the objective's
    statistic, lr, the stop signal any rank received or 0)."""
    t, tc = s.target, s.target.cfg.trainer
    lr = s.lr_fn(s.step)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    s.optimizer.zero_grad(set_to_none=True)
    images = b.images.contiguous(memory_format=torch.channels_last) if tc.channels_last else b.images
    loss, stat = s.objective.backward(s.model, images, b, int(tc.accum_steps), s.autocast, s.scale_loss)
    # All ranks agree on the loss (mean) and on a stop signal that reached any of them.
    loss, sig = dist.all_mean_max(t.denv, loss, float(stop.received or 0), t.device)
    if not math.isfinite(loss):
        good = ckpt.latest_path(t.run_dir)
        good = good if good.exists() else ckpt.epoch_path(t.run_dir, 0)
        raise ClipgenError(f"loss is {loss} at step {s.step + 1} (epoch {b.epoch}, batch {b.index}) of {t.name}: "
                           f"no step was taken and nothing was saved, the last good checkpoint {str(good)!r} is "
                           "kept; lower optim.lr or use trainer.precision=fp32")
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.objective.after_step(s.model)
    s.step += 1
    s.samples_seen += b.images.shape[0] * t.denv.world_size
    s.last_loss = loss
    return loss, stat, lr, sig


def _log_step(s: Session, b, loss: float, lr: float, stat: float, meter: _Meter, bar) -> None:
    world, stat_name = s.target.denv.world_size, s.objective.stat
    sps = meter.steps * b.images.shape[0] * world / max(time.time() - meter.since, 1e-9)
    if bar is not None:
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {sps:.0f} samples/s")
    else:
        log.info("step %d/%d | epoch %d/%d | loss %.4f | lr %.2e | %s %.3f | %.0f samples/s",
                 s.step, s.total, b.epoch + 1, s.epochs, loss, lr, stat_name, stat, sps)
    s.logger.log({"train/loss": loss, "train/lr": lr, f"train/{stat_name}": stat, "train/samples_per_s": sps,
                  "train/data_time": meter.data_time / meter.steps,
                  "train/epoch": b.epoch + (b.index + 1) / s.loader.steps_per_epoch}, step=s.step)
    meter.since, meter.steps, meter.data_time = time.time(), 0, 0.0


def _end_epoch(s: Session, e: int, subset_eval) -> None:
    """The epoch checkpoint first, then latest.pt pointing at the next epoch, then eval.during_training."""
    if rundir.is_saved_epoch(e + 1, s.epochs, int(s.target.cfg.trainer.save_every_epochs)):
        save_epoch(s, e + 1)
    save_latest(s, {"epoch": e + 1, "batch": 0})
    if subset_eval is not None:  # after the saves; leaves RNG, weights and train mode as they were
        subset_eval(unwrap(s.model), epoch=e + 1, step=s.step, logger=s.logger)


def _report(s: Session, stopped: str | None, previous_handler, steps_here: int, t_loop: float) -> dict:
    """The closing line and the result; after a stop signal, the requeue and ``SystemExit(128 + signal)``."""
    t, tc = s.target, s.target.cfg.trainer
    seconds = time.time() - t_loop
    sps = steps_here * int(tc.batch_size) / seconds if steps_here else None
    if stopped and stopped != "max_steps":
        if s.main:
            what = requeue_after_stop(stopped, previous_handler, bool(tc.requeue))
            print(f"clipgen: received {stopped}: saved {ckpt.latest_path(t.run_dir)} at step {s.step}/{s.total} "
                  f"({what}); rerun the same command to resume")
        raise SystemExit(128 + int(signal.Signals[stopped]))
    status = "running" if stopped else "finished"
    if s.main and status == "finished":
        _export_last(t)
    if s.main:
        print(f"clipgen: {t.name} {status} at step {s.step}/{s.total} (epoch {s.step // s.loader.steps_per_epoch}/"
              f"{s.epochs}), loss {s.last_loss if s.last_loss is None else round(s.last_loss, 4)}, "
              f"{sps or 0:.0f} samples/s -> {t.run_dir}")
    return {"run_dir": str(t.run_dir), "status": status, "steps": s.step, "epochs": s.epochs,
            "final_loss": s.last_loss, "seconds": time.time() - t.t_call, "samples_per_s": sps}
