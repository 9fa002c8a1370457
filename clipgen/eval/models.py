"""Loading a run's checkpoints and turning a model into logits over a task's classes, for both model kinds.

``meta.json["model_kind"]`` (absent means ``"clip"``) names the run's objective (clipgen.train.objective), which
builds the model and picks the head:

- ``clip``: the zero-shot head of clipgen.eval.zeroshot (class embeddings from the templates; logits =
  logit_scale x cosine).
- ``supervised`` (clipgen.train.supervised_model): the head's DomainNet columns restricted to the run's classes,
  column 1000 + DomainNet label of each class (protocol §5); logits are the raw linear outputs (logit_scale 1).

Both give ``{"logits", "preds", "image_embeddings", "logit_scale"}``, so every metric key is the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clipgen.errors import ClipgenError


def model_kind(meta: dict, meta_path: Path | str = "meta.json") -> str:
    from clipgen.train.objective import OBJECTIVES

    kind = meta.get("model_kind") or "clip"
    if kind not in OBJECTIVES:
        raise ClipgenError(f"{meta_path} has model_kind {kind!r}: expected one of {', '.join(OBJECTIVES)} "
                           "(absent means clip)")
    return kind


def _load_state(model, state: dict, path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        detail = (f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(shapes)} of another shape (e.g. {shapes[:2]})")
        if not (missing or unexpected or shapes):
            detail = str(e).splitlines()[0]
        raise ClipgenError(f"checkpoint {str(path)!r} does not fit model {name!r}: {detail}; expected a "
                           f"state_dict of {name} with open_clip key names") from None


def load_checkpoint(path: Path, meta: dict, image_px: int, kind: str = "clip", reuse: dict | None = None):
    """``(model in eval mode, tokenizer or None, checkpoint dict)``. Every way a checkpoint can disagree with its
    run is a ClipgenError naming the file and what was expected, not a torch stack trace.

    ``reuse`` (a dict the caller keeps across checkpoints) holds one built model and tokenizer per model name:
    later checkpoints of the same architecture are loaded into it (``load_state_dict`` overwrites every parameter
    and buffer) instead of building, randomly initialising and discarding a model and a tokenizer each time."""
    from clipgen.train.checkpoint import load

    ckpt = load(path)  # torch.load(weights_only=True); one-line errors for missing, corrupt, no state_dict
    if "model_name" not in ckpt:
        raise ClipgenError(f"checkpoint {str(path)!r} has no 'model_name': expected the keys state_dict, "
                           "model_name, model_cfg, epoch, step, samples_seen (clipgen/FORMATS.md)")
    name = ckpt["model_name"]
    if meta.get("model_name") and name != meta["model_name"]:
        raise ClipgenError(f"checkpoint {str(path)!r} has model_name {name!r}: expected the run's model "
                           f"{meta['model_name']!r} (meta.json)")
    found = ckpt.get("kind") or "clip"
    if found != kind:
        raise ClipgenError(f"checkpoint {str(path)!r} is a {found!r} checkpoint: expected a {kind!r} one, as the "
                           "run's meta.json model_kind says")
    key = (kind, name, int(ckpt.get("num_classes", 0)))
    if reuse is not None and key in reuse:
        model, tokenizer = reuse[key]
    else:
        from clipgen.train.objective import objective_for

        model, tokenizer = objective_for(kind).create_model(name, image_px, ckpt)
    if reuse is not None:
        reuse.pop(key, None)  # a model whose load fails half-way is not handed out again
    _load_state(model, ckpt["state_dict"], path, name)
    if reuse is not None:
        reuse[key] = (model, tokenizer)
    return model.eval(), tokenizer, ckpt


def _as_batch(images, start: int, batch_size: int, device):
    import torch

    from clipgen.eval.zeroshot import normalize_images

    batch = images[start:start + batch_size]
    batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    batch = batch.to(device)
    return normalize_images(batch) if batch.dtype == torch.uint8 else batch


def supervised_outputs(model, images, classnames: Sequence[str], device="cpu", batch_size: int = 512) -> dict:
    """The supervised model's zero-shot-equivalent outputs over ``classnames`` (uint8 ``[n, 3, h, w]`` images):
    logits = head outputs at columns 1000 + DomainNet label, embeddings = the normalised tower features."""
    import torch

    from clipgen.train.supervised_model import domainnet_columns, restricted_logits

    columns = domainnet_columns(classnames)
    model = model.to(device).eval()
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        lo, f = restricted_logits(model, _as_batch(images, start, batch_size, device), columns)
        logits.append(lo.float().cpu())
        feats.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
    logits = torch.cat(logits).numpy() if logits else np.zeros((0, len(columns)), dtype=np.float32)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, model.embed_dim), dtype=np.float32)
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    return {"logits": logits, "preds": preds, "image_embeddings": emb, "logit_scale": 1.0}


def clip_outputs(model, tokenizer, images, classnames: Sequence[str], templates: Sequence[str], device="cpu",
                 batch_size: int = 512, tokens=None) -> dict:
    """The zero-shot head's outputs over ``classnames`` (``tokens``: pre-tokenised prompts, see
    clipgen.eval.zeroshot.tokenize_prompts)."""
    from clipgen.eval.zeroshot import class_embeddings, encode_images, model_logit_scale, zeroshot_logits

    model = model.to(device)
    class_emb = class_embeddings(model, tokenizer, classnames, templates, device, batch_size, tokens)
    image_emb = encode_images(model, images, device, batch_size)
    scale = model_logit_scale(model)
    logits = zeroshot_logits(image_emb, class_emb, scale).cpu().numpy()
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    return {"logits": logits, "preds": preds, "image_embeddings": image_emb.numpy(), "logit_scale": scale}


def model_outputs(kind: str, model, tokenizer, images, classnames: Sequence[str], templates: Sequence[str],
                  device="cpu", batch_size: int = 512, tokens=None) -> dict:
    """The head of objective ``kind`` (its ``outputs``)."""
    from clipgen.train.objective import objective_for

    return objective_for(kind).outputs(model, tokenizer, images, classnames, templates, device, batch_size, tokens)
