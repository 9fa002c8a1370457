"""The CLIP training loop: one readable function in the spirit of nanoGPT, resumable bit for bit.

``run_train(cfg)`` builds (or finds) the recipe, trains an open_clip model from scratch on recipe + base corpus
and writes the run directory of clipgen/FORMATS.md. A finished run is a no-op. An unfinished one resumes from
``latest.pt`` by default: model, optimizer, scaler, RNG and loader position are restored, and because the data
order and augmentation depend only on (seed, epoch, batch index) (see clipgen.train.data), an interrupted and
resumed fp32 CPU run ends with the same weights, bit for bit, as an uninterrupted one.

SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before preemption or the time limit) and SIGINT (Ctrl-C) set a
flag; at the next step boundary latest.pt is saved and the process exits with status 128 + signal number, ready
to be requeued (never after Ctrl-C; a second Ctrl-C stops at once). One trainer works in a run directory at a
time (clipgen.runlock); temporary files that killed trainers left there are removed when the next one starts.

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
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clipgen import rundir, runlock
from clipgen.errors import ClipgenError
from clipgen.train import checkpoint as ckpt
from clipgen.train import dist
from clipgen.train.objective import (check_trainer_config, clip_backward, enable_grad_checkpointing, make_optimizer,
                                     schedule, supervised_backward)
from clipgen.train.data import EpochLoader, bad_samples_report, check_data_config, load_train_data
from clipgen.train.stream import StreamLoader, choose_loader, load_stream_data
from clipgen.eval.during_training import subset_evaluator
from clipgen.train.logger import NullLogger, check_logger_config, make_logger
from clipgen.train.model import create_clip, model_config
from clipgen.train.supervised_model import create_supervised, supervised_labels, supervised_payload
from clipgen.utils import atomic_write_json, atomic_write_text, git_sha, read_json, sha256_file, sweep_temp_files

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to at most 100
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
# What a killed trainer's atomic writes leave behind (clipgen.utils: ".{name}.<random>.tmp").
TRAINER_TEMP_FILES = (".latest.pt.*.tmp", ".meta.json.*.tmp", ".config.yaml.*.tmp", "checkpoints/.epoch_*.pt.*.tmp")
PRECISIONS = ("fp32", "bf16", "amp")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipgenError("trainer.device=cuda but no CUDA device is available: expected trainer.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ClipgenError(f"unknown trainer.device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """fp32: nothing; bf16: autocast on CPU or CUDA; amp: fp16 autocast, CUDA only (it needs a GradScaler)."""
    if precision not in PRECISIONS:
        raise ClipgenError(f"unknown trainer.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "amp" and device.type != "cuda":
        raise ClipgenError(f"trainer.precision=amp needs CUDA (fp16 + GradScaler), but the device is "
                           f"{device.type}: use trainer.precision=bf16 or fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_same_run(run_dir: Path, old: dict, spec: dict, manifest_sha: str) -> None:
    hint = "pick another run_name=... or paths.root=... (finished work is never overwritten)"
    if old.get("manifest_sha256") != manifest_sha:
        raise ClipgenError(f"run dir {str(run_dir)!r} was trained on a different recipe (manifest sha256 "
                           f"{str(old.get('manifest_sha256'))[:12]}, now {manifest_sha[:12]}): {hint}")
    diff = rundir.spec_differences(old["train_spec"], spec) if "train_spec" in old else []
    if diff:
        raise ClipgenError(f"run dir {str(run_dir)!r} was started with {', '.join(diff)}: {hint}")


class StopSignals:
    """Turn SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a flag checked at step boundaries; previous handlers come back on
    exit. A second SIGINT raises KeyboardInterrupt (Ctrl-C twice: stop now, without saving). Handlers can only be
    installed from the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def previous(self, name: str):
        """The handler that was installed for signal ``name`` before this one (submitit's, under submitit)."""
        return self._previous.get(getattr(signal, name, None))


def requeue_after_stop(stopped: str, handler, enabled: bool) -> str:
    """After latest.pt is saved on a stop signal: who brings the job back. Under submitit, its own handler
    (checkpoint + requeue; rank 0 exits there). Under a plain SLURM job, ``scontrol requeue`` on SIGUSR1/SIGUSR2
    (``#SBATCH --signal=USR1@180`` before the time limit); SIGTERM is scancel's signal (and preemption with
    PreemptMode=REQUEUE requeues by itself), so it never requeues. Returns what happened, for the log."""
    if not enabled:
        return "trainer.requeue=false"
    if stopped == "SIGINT":  # the user asked to stop
        return "not requeued"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        if callable(handler):
            handler(getattr(signal, stopped), None)
            return "submitit's handler requeued the job"
        return "submitit: no handler to delegate to"
    job = os.environ.get("SLURM_JOB_ID")
    if not job or stopped == "SIGTERM":
        return "not requeued"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e})"
    if out.returncode:
        return f"scontrol requeue {job} failed: {out.stderr.strip() or out.returncode}"
    return f"requeued SLURM job {job}"


def run_train(cfg: DictConfig) -> dict:
    """Train (or resume, or skip if finished) the run the config names. Returns ``{"run_dir", "status", "steps",
    "epochs", "final_loss", "seconds", "samples_per_s"}`` (status "finished", or "running" when stopped early by
    trainer.max_steps)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_call = time.time()
    # Cheap config checks first, so a typo fails before the recipe is built.
    for key in ("epochs", "batch_size", "log_every", "save_every_steps"):
        if int(cfg.trainer[key]) < 1:
            raise ClipgenError(f"trainer.{key}={cfg.trainer[key]}: expected a positive integer")
    device = resolve_device(cfg.trainer.device)
    autocast(cfg.trainer.precision, device)
    check_logger_config(cfg)
    check_data_config(cfg.data)
    check_trainer_config(cfg.trainer, cfg.optim)
    if cfg.trainer.objective == "supervised" and cfg.eval.during_training:
        raise ClipgenError("eval.during_training=true is a zero-shot CLIP evaluation: expected it off for "
                           "trainer.objective=supervised (clipgen-eval evaluates supervised checkpoints)")
    mcfg = model_config(cfg.model.name)
    if cfg.recipe.dry_run:
        raise ClipgenError("recipe.dry_run=true builds nothing to train on: expected recipe.dry_run=false for training")
    denv = dist.detect()
    if int(cfg.trainer.batch_size) % denv.world_size:
        raise ClipgenError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and does not split over "
                           f"{denv.world_size} processes ({denv.launcher}): expected a multiple of {denv.world_size}")
    if cfg.trainer.sync_bn and device.type != "cuda":
        raise ClipgenError("trainer.sync_bn=true needs CUDA (SyncBatchNorm has no CPU implementation): expected "
                           "trainer.sync_bn=false on CPU")
    if int(cfg.trainer.batch_size) // denv.world_size % int(cfg.trainer.accum_steps):
        raise ClipgenError(f"trainer.accum_steps={cfg.trainer.accum_steps} does not divide the per-process batch "
                           f"{int(cfg.trainer.batch_size) // denv.world_size}: expected a divisor of it")
    device = dist.init(denv, device)
    try:
        with contextlib.ExitStack() as held:  # holds the run directory's lock, taken in _run
            return _run(cfg, denv, device, mcfg, t_call, held)
    finally:
        dist.shutdown(denv)


def _finished(run_dir: Path, name: str, spec: dict, manifest_sha: str, t_call: float) -> dict | None:
    """The result of a run that already finished (a rerun is a no-op), or None."""
    if not (run_dir / "meta.json").exists():
        return None
    old = read_json(run_dir / "meta.json", "run meta")
    _check_same_run(run_dir, old, spec, manifest_sha)
    if old.get("status") != "finished":
        return None
    print(f"clipgen: {name} already finished ({old.get('step')} steps, {old.get('epochs')} epochs, final "
          f"loss {old.get('final_loss')}) in {run_dir}; nothing to do")
    return {"run_dir": str(run_dir), "status": "finished", "steps": old.get("step"),
            "epochs": old.get("epochs"), "final_loss": old.get("final_loss"),
            "seconds": time.time() - t_call, "samples_per_s": None, "skipped": True}


def _run(cfg: DictConfig, denv: dist.DistEnv, device: torch.device, mcfg: dict, t_call: float,
         held: contextlib.ExitStack) -> dict:
    from clipgen.recipes.build import ensure_recipe

    if not denv.is_main:  # rank 0 builds the recipe (and the world) once; the others then find it
        dist.barrier(denv)
    recipe_dir = Path(ensure_recipe(cfg))
    if denv.is_main:
        dist.barrier(denv)
    manifest = read_json(recipe_dir / "manifest.json", "recipe manifest")
    manifest_sha = sha256_file(recipe_dir / "manifest.json")
    run_dir = rundir.run_dir(cfg, manifest["recipe_id"])
    name = run_dir.name
    spec = rundir.train_spec(cfg)
    done = _finished(run_dir, name, spec, manifest_sha, t_call)
    if done is None and denv.is_main:  # one trainer per run directory; the kernel releases it however we end
        held.enter_context(runlock.exclusive(run_dir, "being trained", "one clipgen-train per run directory"))
        done = _finished(run_dir, name, spec, manifest_sha, t_call)  # another trainer may have finished it meanwhile
        sweep_temp_files(run_dir, TRAINER_TEMP_FILES)  # only a trainer writes these, and we hold the lock
    if done is not None:
        return done

    threads = torch.get_num_threads()
    if cfg.trainer.threads > 0:
        torch.set_num_threads(int(cfg.trainer.threads))
    try:
        return _train(cfg, denv, device, mcfg, recipe_dir, manifest, manifest_sha, name, run_dir, spec, t_call)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, denv, device, mcfg, recipe_dir, manifest, manifest_sha, name, run_dir, spec, t_call) -> dict:
    from open_clip.loss import ClipLoss

    tc, oc = cfg.trainer, cfg.optim
    supervised = tc.objective == "supervised"
    # Seeding right before the model is built makes epoch_000 a function of trainer.seed alone.
    torch.manual_seed(int(tc.seed))
    if supervised:
        import open_clip

        model = create_supervised(cfg.model.name, cfg.model.image_px)
        tokenizer = open_clip.get_tokenizer(cfg.model.name)
    else:
        model, tokenizer = create_clip(cfg.model.name, cfg.model.image_px)
    if tc.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    main = denv.is_main  # only rank 0 writes files and logs
    px, workers, policy = int(cfg.model.image_px), int(cfg.data.workers), str(cfg.data.on_bad_sample)
    loader_kind = choose_loader(cfg.data, recipe_dir, manifest, px)
    if loader_kind == "stream":
        data = load_stream_data(recipe_dir, px, manifest, workers=workers, on_bad_sample=policy)
        loader = StreamLoader(data, int(tc.batch_size), int(tc.seed), px, tokenizer, device, rank=denv.rank,
                              world_size=denv.world_size, workers=workers, epochs=int(tc.epochs))
    else:
        data = load_train_data(recipe_dir, tokenizer, px, manifest, workers=workers, on_bad_sample=policy,
                               max_memory_gb=float(cfg.data.max_memory_gb))
        loader = EpochLoader(data, int(tc.batch_size), int(tc.seed), px, device, rank=denv.rank,
                             world_size=denv.world_size)
    if data.bad_samples:
        log.warning("skipped %d bad samples (data.on_bad_sample=skip), first: %s", data.num_skipped,
                    data.bad_samples[0])
    if supervised:
        data.labels = supervised_labels(data.meta, recipe_dir)
    spe, epochs = loader.steps_per_epoch, int(tc.epochs)
    total = epochs * spe
    optimizer = make_optimizer(model, oc)
    lr_fn = schedule(oc, spe, total)
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "amp" else None
    # Paper: local loss with gather-with-grad (no-ops in one process).
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=denv.rank,
                       world_size=denv.world_size)
    common = dict(model_name=cfg.model.name, model_cfg=mcfg, run_name=name, recipe_id=manifest["recipe_id"],
                  seed=int(tc.seed))
    payload_fn = supervised_payload if supervised else ckpt.epoch_payload

    run_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt.load_latest(run_dir)
    if latest is not None:
        if (latest.get("train_spec", spec) != spec or latest.get("manifest_sha256", manifest_sha) != manifest_sha
                or latest.get("model_cfg", mcfg) != mcfg):  # e.g. saved before the tiny models' compact vocabulary
            raise ClipgenError(f"{str(ckpt.latest_path(run_dir))!r} belongs to a run with other settings or data: "
                               "pick another run_name=... or paths.root=...")
        if latest.get("num_samples", len(data)) != len(data):  # e.g. another number of bad samples skipped now
            raise ClipgenError(f"{str(ckpt.latest_path(run_dir))!r} was saved with {latest['num_samples']} training "
                               f"samples, the recipe now gives {len(data)}: expected the same samples to resume")
        ckpt.unwrap(model).load_state_dict(latest["state_dict"])
        optimizer.load_state_dict(latest["optimizer"])
        if scaler is not None and latest.get("scaler"):
            scaler.load_state_dict(latest["scaler"])
        ckpt.set_rng_state(latest["rng"])
        step, samples_seen = int(latest["step"]), int(latest["samples_seen"])
        epoch, batch = int(latest["position"]["epoch"]), int(latest["position"]["batch"])
        wandb_id, prior_seconds = latest.get("wandb_id"), float(latest.get("train_seconds", 0.0))
        last_loss = latest.get("last_loss")
        log.info("resuming %s at step %d/%d (epoch %d, batch %d)", name, step, total, epoch, batch)
    else:
        step = samples_seen = epoch = batch = 0
        wandb_id, prior_seconds, last_loss = None, 0.0, None
        if main:
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            ckpt.save_epoch(run_dir, payload_fn(model, epoch=0, step=0, samples_seen=0, **common),
                            str(tc.checkpoint_dtype))
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.grad_checkpointing:
        enable_grad_checkpointing(model)
    if denv.distributed:  # after any resume: every replica starts from the same weights
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)
    accum = int(tc.accum_steps)
    amp_ctx = functools.partial(autocast, tc.precision, device)
    scale_loss = scaler.scale if scaler is not None else (lambda loss: loss)

    subset_eval = subset_evaluator(cfg, manifest, tokenizer) if main else None  # eval.during_training
    sha = git_sha()
    logger = (make_logger(cfg, run_dir, name, run_id=wandb_id, extra_config={
        "manifest_sha256": manifest_sha, "git_sha": sha, "recipe_dir": str(recipe_dir),
        "world_size": denv.world_size}) if main else NullLogger())
    ident = rundir.identity(cfg)
    t_seg = time.time()  # train_seconds accumulates over resumed segments

    def write_meta(status: str) -> None:
        if not main:
            return
        atomic_write_json(run_dir / "meta.json", {
            "run_name": name, "recipe_id": manifest["recipe_id"], "recipe_kind": manifest.get("kind"),
            "recipe_dir": str(recipe_dir), "manifest_sha256": manifest_sha, "test_domain": manifest.get("test_domain"),
            "heldout_classes": manifest.get("heldout_classes"), "classes": manifest.get("classes"),
            "seed": int(tc.seed), "model_name": cfg.model.name, "model_cfg": mcfg, "image_px": int(cfg.model.image_px),
            "epochs": epochs, "batch_size": int(tc.batch_size), "steps_per_epoch": spe,
            "samples_per_epoch": loader.samples_per_epoch, "total_steps": total, "status": status, "step": step,
            "samples_seen": samples_seen, "git_sha": sha, "wandb_id": logger.id,
            "train_seconds": prior_seconds + time.time() - t_seg, "final_loss": last_loss, "train_spec": spec,
            "num_samples": {"recipe": data.num_recipe, "base": data.num_base},
            "bad_samples": bad_samples_report(data), "world_size": denv.world_size, "model_kind": tc.objective,
            "identity": ident, "wandb": logger.ident})

    def save_latest(position: dict) -> None:
        if not main:
            return
        payload = payload_fn(model, epoch=position["epoch"], step=step, samples_seen=samples_seen, **common)
        ckpt.save_latest(run_dir, payload, optimizer=optimizer, scaler=scaler, position=position, extra={
            "wandb_id": logger.id, "train_seconds": prior_seconds + time.time() - t_seg, "last_loss": last_loss,
            "train_spec": spec, "manifest_sha256": manifest_sha, "steps_per_epoch": spe, "total_steps": total,
            "num_samples": len(data)})
        write_meta("running")

    log.info("training %s: %d samples (recipe %d + base %d, %s loader), %d epochs x %d steps of %d, device %s, %s",
             name, len(data), data.num_recipe, data.num_base, loader_kind, epochs, spe, tc.batch_size, device,
             tc.precision)
    steps_here, t_loop, stopped, previous_handler = 0, time.time(), None, None
    if 0 < tc.max_steps <= step < total:  # a rerun with the same max_steps has nothing left to do
        stopped = "max_steps"
    t_log, n_log, data_time = time.time(), 0, 0.0
    model.train()
    # A progress bar on a terminal; plain log lines every trainer.log_every steps otherwise (batch jobs, pipes).
    bar = None
    if main and tc.progress_bar and sys.stderr.isatty() and step < total:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True)
    try:
        with StopSignals() as stop:
            write_meta("running")
            for e in range(epoch, epochs):
                batches = loader.batches(e, batch if e == epoch else 0)
                while stopped is None:
                    t0 = time.time()
                    b = next(batches, None)
                    data_time += time.time() - t0
                    if b is None:
                        break
                    lr = lr_fn(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                    images = b.images.contiguous(memory_format=torch.channels_last) if tc.channels_last else b.images
                    if supervised:
                        loss_value, stat = supervised_backward(model, images, b.labels, accum, amp_ctx, scale_loss)
                    else:
                        loss_value, stat = clip_backward(model, loss_fn, images, b.tokens, accum, amp_ctx,
                                                         scale_loss)
                    # All ranks agree on the loss (mean) and on a stop signal that reached any of them.
                    loss_value, sig = dist.all_mean_max(denv, loss_value, float(stop.received or 0), device)
                    if not math.isfinite(loss_value):
                        good = ckpt.latest_path(run_dir)
                        good = good if good.exists() else ckpt.epoch_path(run_dir, 0)
                        raise ClipgenError(f"loss is {loss_value} at step {step + 1} (epoch {e}, batch {b.index}) of "
                                           f"{name}: no step was taken and nothing was saved, the last good "
                                           f"checkpoint {str(good)!r} is kept; lower optim.lr or use "
                                           "trainer.precision=fp32")
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    if not supervised:
                        with torch.no_grad():
                            ckpt.unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                    step, steps_here, n_log = step + 1, steps_here + 1, n_log + 1
                    if bar is not None:
                        bar.update(1)
                    samples_seen += b.images.shape[0] * denv.world_size
                    last_loss = loss_value
                    position = {"epoch": e, "batch": b.index + 1}

                    if main and (step % tc.log_every == 0 or step == total):
                        dt = time.time() - t_log
                        sps = n_log * b.images.shape[0] * denv.world_size / max(dt, 1e-9)
                        what = "train/acc" if supervised else "train/logit_scale"  # stat: batch accuracy / scale
                        if bar is not None:
                            bar.set_postfix_str(f"loss {loss_value:.4f} lr {lr:.2e} {sps:.0f} samples/s")
                        else:
                            log.info("step %d/%d | epoch %d/%d | loss %.4f | lr %.2e | %s %.3f | %.0f samples/s",
                                     step, total, e + 1, epochs, loss_value, lr, what.split("/")[1], stat, sps)
                        logger.log({"train/loss": loss_value, "train/lr": lr, what: stat,
                                    "train/samples_per_s": sps, "train/data_time": data_time / n_log,
                                    "train/epoch": e + (b.index + 1) / spe}, step=step)
                        t_log, n_log, data_time = time.time(), 0, 0.0

                    if sig:
                        stopped = signal.Signals(int(sig)).name
                    elif tc.max_steps > 0 and step >= tc.max_steps and step < total:
                        stopped = "max_steps"
                    if stopped or step % tc.save_every_steps == 0:
                        save_latest(position)
                if stopped:
                    break
                # Epoch end: the epoch checkpoint first, then latest.pt pointing at the next epoch.
                if main and ((e + 1) % int(tc.save_every_epochs) == 0 or e + 1 == epochs):
                    ckpt.save_epoch(run_dir, payload_fn(model, epoch=e + 1, step=step, samples_seen=samples_seen,
                                                        **common), str(tc.checkpoint_dtype))
                save_latest({"epoch": e + 1, "batch": 0})
                if subset_eval is not None:  # after the saves; leaves RNG, weights and train mode as they were
                    subset_eval(ckpt.unwrap(model), epoch=e + 1, step=step, logger=logger)

            if stopped is None:
                write_meta("finished")
            elif stopped != "max_steps":
                previous_handler = stop.previous(stopped)
    finally:
        if bar is not None:
            bar.close()
        logger.finish()

    seconds = time.time() - t_loop
    sps = steps_here * int(tc.batch_size) / seconds if steps_here else None
    status = "running" if stopped else "finished"
    if stopped and stopped != "max_steps":
        if main:
            what = requeue_after_stop(stopped, previous_handler, bool(tc.requeue))
            print(f"clipgen: received {stopped}: saved {ckpt.latest_path(run_dir)} at step {step}/{total} ({what}); "
                  "rerun the same command to resume")
        raise SystemExit(128 + int(signal.Signals[stopped]))
    if main:
        print(f"clipgen: {name} {status} at step {step}/{total} (epoch {step // spe}/{epochs}), loss "
              f"{last_loss if last_loss is None else round(last_loss, 4)}, "
              f"{sps or 0:.0f} samples/s -> {run_dir}")
    return {"run_dir": str(run_dir), "status": status, "steps": step, "epochs": epochs, "final_loss": last_loss,
            "seconds": time.time() - t_call, "samples_per_s": sps}
