"""Writing epoch checkpoints and ``latest.pt`` (clipgen/FORMATS.md), every write atomic; reading ``latest.pt``
to resume. The epoch payload and reading any checkpoint are clipgen.models.checkpoint's, shared with the stages
that load models. ``latest.pt`` adds what a resume needs to continue bit for bit: optimizer, scaler, RNG states
and the loader position.
"""
from __future__ import annotations

from pathlib import Path

import torch

from clipgen import rundir
from clipgen.models.checkpoint import load
from clipgen.files import atomic_torch_save

# The run directory's file names live in clipgen.rundir.
epoch_path = rundir.checkpoint_path
latest_path = rundir.latest_path


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


def save_latest(run_dir: str | Path, payload: dict, *, optimizer: torch.optim.Optimizer | None, scaler,
                position: dict, extra: dict) -> Path:
    """Atomically replace ``latest.pt``: an epoch payload plus optimizer, scaler, RNG and loader position
    (``{"epoch": e, "batch": b}`` = the next batch to train on). ``optimizer=None`` (and ``scaler=None``) when
    nothing is left to train: the float32 weights and counters are kept, the optimizer state (twice the weights'
    size under AdamW) is not."""
    state = dict(payload)
    state.update(optimizer=optimizer.state_dict() if optimizer is not None else None,
                 scaler=scaler.state_dict() if scaler is not None else None,
                 rng=rng_state(), position={"epoch": int(position["epoch"]), "batch": int(position["batch"])},
                 **extra)
    path = latest_path(run_dir)
    atomic_torch_save(state, path)
    return path


def load_latest(run_dir: str | Path) -> dict | None:
    path = latest_path(run_dir)
    return load(path) if path.exists() else None
