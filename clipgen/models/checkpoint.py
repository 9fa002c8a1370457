"""The epoch checkpoint's payload (clipgen/FORMATS.md) and reading any clipgen checkpoint back: what saving
(clipgen.train.checkpoint) and every stage that loads a model share.

An epoch checkpoint is what open_clip itself loads: ``{"state_dict": <open_clip key names, no "module.">,
"model_name", "model_cfg", ...}``, so ``open_clip.create_model_and_transforms(name, pretrained=path)`` works
(after ``clipgen.models.factory.register_clipgen_models()`` for clipgen's tiny models). Every read is
``weights_only=True``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from clipgen.errors import ClipgenError


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
