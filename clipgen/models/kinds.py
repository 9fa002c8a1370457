"""What a run's model is, for every stage that builds or loads one: one :class:`ModelKind` per ``model_kind`` a
run records (clipgen.rundir's meta; absent means ``"clip"``; the same names as ``trainer.objective``). A kind builds
the model, writes its epoch checkpoint's payload and gives its evaluation head:

- ``clip``: the zero-shot head of clipgen.models.zeroshot (class embeddings from the templates; logits =
  logit_scale x cosine).
- ``supervised`` (clipgen.models.supervised): the head's DomainNet columns restricted to the run's classes,
  column 1000 + DomainNet label of each class (protocol §5); logits are the raw linear outputs (logit_scale 1).

Both heads give ``{"logits", "preds", "image_embeddings", "logit_scale"}``, so every metric key is the same.
The trainer's objectives (clipgen.train.objective) are these kinds plus their loss; evaluation and analysis ask
the kind (``kind_for(name)``) and load checkpoints with :func:`load_checkpoint`.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

from clipgen.errors import ClipgenError
from clipgen.rundir import META
from clipgen.models.checkpoint import epoch_payload, load
from clipgen.models.factory import weights_to_be_loaded


class ModelKind(abc.ABC):
    """The model-facing interface; see the module docstring. ``text_head`` says whether evaluation uses CLIP's
    zero-shot text head (prompt templates, ImageNet's 1000 classes) rather than a classifier's columns."""

    name = ""
    text_head = False

    @abc.abstractmethod
    def create_model(self, model_name: str, image_px: int | None, checkpoint: dict | None = None):
        """``(randomly initialised model, its tokenizer or None)``, shaped like ``checkpoint`` when given."""

    def payload(self, model, **fields) -> dict:
        """An epoch checkpoint (clipgen/FORMATS.md); ``fields`` are those of checkpoint.epoch_payload."""
        return epoch_payload(model, **fields)

    @abc.abstractmethod
    def outputs(self, model, tokenizer, images, classnames: Sequence[str], templates: Sequence[str], device="cpu",
                batch_size: int = 512, tokens=None) -> dict:
        """Evaluation: ``{"logits", "preds", "image_embeddings", "logit_scale"}`` over ``classnames``."""


class ClipModel(ModelKind):
    """An open_clip CLIP model (clipgen.models.factory) scored by its zero-shot head."""

    name, text_head = "clip", True

    def create_model(self, model_name, image_px, checkpoint=None):
        from clipgen.models.factory import create_clip

        return create_clip(model_name, image_px)

    def outputs(self, model, tokenizer, images, classnames, templates, device="cpu", batch_size=512, tokens=None):
        from clipgen.models.zeroshot import clip_outputs

        return clip_outputs(model, tokenizer, images, classnames, templates, device, batch_size, tokens)


class SupervisedModel(ModelKind):
    """clipgen.models.supervised's 1345-way classifier on CLIP's visual tower."""

    name, text_head = "supervised", False

    def create_model(self, model_name, image_px, checkpoint=None):
        from clipgen.models.supervised import NUM_CLASSES, create_supervised

        num_classes = int((checkpoint or {}).get("num_classes", NUM_CLASSES))
        return create_supervised(model_name, image_px, num_classes), None

    def payload(self, model, **fields):
        from clipgen.models.supervised import supervised_payload

        return supervised_payload(model, **fields)

    def outputs(self, model, tokenizer, images, classnames, templates, device="cpu", batch_size=512, tokens=None):
        from clipgen.models.supervised import supervised_outputs

        return supervised_outputs(model, images, classnames, device, batch_size)


MODEL_KINDS = {k.name: k for k in (ClipModel, SupervisedModel)}  # a run's recorded model_kind / trainer.objective


def kind_for(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise ClipgenError(f"unknown model kind {name!r}: expected one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name]()


def model_kind(meta: dict, meta_path: Path | str) -> str:
    kind = meta.get("model_kind") or "clip"
    if kind not in MODEL_KINDS:
        raise ClipgenError(f"{meta_path} has model_kind {kind!r}: expected one of {', '.join(MODEL_KINDS)} "
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
    ckpt = load(path)  # torch.load(weights_only=True); one-line errors for missing, corrupt, no state_dict
    if "model_name" not in ckpt:
        raise ClipgenError(f"checkpoint {str(path)!r} has no 'model_name': expected the keys state_dict, "
                           "model_name, model_cfg, epoch, step, samples_seen (clipgen/FORMATS.md)")
    name = ckpt["model_name"]
    if meta.get("model_name") and name != meta["model_name"]:
        raise ClipgenError(f"checkpoint {str(path)!r} has model_name {name!r}: expected the run's model "
                           f"{meta['model_name']!r} ({META})")
    found = ckpt.get("kind") or "clip"
    if found != kind:
        raise ClipgenError(f"checkpoint {str(path)!r} is a {found!r} checkpoint: expected a {kind!r} one, as the "
                           f"run's {META} model_kind says")
    key = (kind, name, int(ckpt.get("num_classes", 0)))
    if reuse is not None and key in reuse:
        model, tokenizer = reuse[key]
    else:
        with weights_to_be_loaded():  # every weight comes from the checkpoint (strict load below)
            model, tokenizer = kind_for(kind).create_model(name, image_px, ckpt)
    if reuse is not None:
        reuse.pop(key, None)  # a model whose load fails half-way is not handed out again
    _load_state(model, ckpt["state_dict"], path, name)
    if reuse is not None:
        reuse[key] = (model, tokenizer)
    return model.eval(), tokenizer, ckpt
