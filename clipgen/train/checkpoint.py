"""Epoch checkpoints and ``latest.pt`` (clipgen/FORMATS.md): every write atomic, every read ``weights_only=True``.

An epoch checkpoint is what open_clip itself loads: ``{"state_dict": <open_clip key names, no "module.">,
"model_name", "model_cfg", ...}``, so ``open_clip.create_model_and_transforms(name, pretrained=path)`` works
(after ``clipgen.train.model.register_clipgen_models()`` for clipgen's tiny models). ``latest.pt`` adds what a
resume needs to continue bit for bit: optimizer, scaler, RNG states and the loader position.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.utils import atomic_torch_save

# The run directory's file names live in clipgen.rundir.
epoch_path = rundir.checkpoint_path
latest_path = rundir.latest_path


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare open_clip model behind DDP (``.module``) or torch.compile (``._orig_mod``) wrappers, so saved
    keys never carry their prefixes."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def model_state(model: torch.nn.Module) -> dict:
    # Cloned to CPU so a later optimizer step cannot change what an in-flight save holds.
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def epoch_payload(model: torch.nn.Module, *, model_name: str, model_cfg: dict, epoch: int, step: int,
                  samples_seen: int, run_name: str, recipe_id: str, seed: int) -> dict:
    return {"state_dict": model_state(model), "model_name": model_name, "model_cfg": model_cfg,
            "epoch": int(epoch), "step": int(step), "samples_seen": int(samples_seen), "run_name": run_name,
            "recipe_id": recipe_id, "seed": int(seed)}


CHECKPOINT_DTYPES = {"fp32": None, "fp16": torch.float16}  # trainer.checkpoint_dtype


def stored_state(state: dict, dtype: str) -> dict:
    """``state`` with its float32 tensors stored as ``dtype``. A tensor fp16 cannot hold (a value beyond its
    range) stays float32; integers (BatchNorm's batch counters) are never touched. Loading casts back to the
    model's float32, so an fp16 checkpoint loads anywhere an fp32 one does."""
    target = CHECKPOINT_DTYPES[dtype]
    if target is None:
        return state
    out = {}
    for k, v in state.items():
        if v.dtype == torch.float32:
            small = v.to(target)
            v = small if bool(torch.isfinite(small).all()) or not bool(torch.isfinite(v).all()) else v
        out[k] = v
    return out


def save_epoch(run_dir: str | Path, payload: dict, dtype: str = "fp32") -> Path | None:
    """Write ``checkpoints/epoch_NNN.pt`` with its weights stored as ``dtype`` (trainer.checkpoint_dtype; latest.pt
    always keeps float32 for an exact resume). Epoch 0 (the untrained model) is never overwritten: a resumed or
    restarted run leaves the original in place. Returns the path written, or None when it was left alone."""
    path = epoch_path(run_dir, payload["epoch"])
    if payload["epoch"] == 0 and path.exists():
        return None
    atomic_torch_save({**payload, "state_dict": stored_state(payload["state_dict"], dtype)}, path)
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_latest(run_dir: str | Path, payload: dict, *, optimizer: torch.optim.Optimizer, scaler, position: dict,
                extra: dict) -> Path:
    """Atomically replace ``latest.pt``: an epoch payload plus optimizer, scaler, RNG and loader position
    (``{"epoch": e, "batch": b}`` = the next batch to train on)."""
    state = dict(payload)
    state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                 rng=rng_state(), position={"epoch": int(position["epoch"]), "batch": int(position["batch"])},
                 **extra)
    path = latest_path(run_dir)
    atomic_torch_save(state, path)
    return path


def load(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with a one-line error naming the file."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClipgenError(f"checkpoint {str(path)!r} does not exist") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClipgenError(f"checkpoint {str(path)!r} cannot be loaded ({msg}): expected a clipgen checkpoint; "
                           "delete it to start over") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ClipgenError(f"checkpoint {str(path)!r} has no 'state_dict': expected a clipgen checkpoint")
    return obj


def load_latest(run_dir: str | Path) -> dict | None:
    path = latest_path(run_dir)
    return load(path) if path.exists() else None
