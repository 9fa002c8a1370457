"""The supervised baseline (protocol §5): CLIP's own visual tower (random init) -> ReLU -> Linear(embed_dim, 1345).

Output columns: 0..999 are ImageNet's classes (open_clip's order, ``clipgen.facts.imagenet_class_index``) and
1000 + l is DomainNet class l (``clipgen.facts.domainnet_label``). ImageNet images whose class maps to DomainNet
are trained on column 1000 + DomainNet label, so the model's zero-shot-equivalent prediction on a DomainNet
image is the argmax over ``logits[:, 1000:1345]``, restricted to the run's classes
(:func:`domainnet_columns`).

Its checkpoints look like CLIP's (clipgen/FORMATS.md) plus ``"kind": "supervised"`` and ``num_classes``; the
state dict keys are ``visual.*`` (open_clip's visual tower names) and ``head.weight`` / ``head.bias``. This module
defines the model and its head once for the supervised trainer and for evaluation; the training targets are the
trainer's (clipgen.train.objective.supervised_labels).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipgen.errors import ClipgenError

KIND = "supervised"
NUM_IMAGENET_CLASSES = 1000
NUM_DOMAINNET_CLASSES = 345
NUM_CLASSES = NUM_IMAGENET_CLASSES + NUM_DOMAINNET_CLASSES  # 1345


class SupervisedClassifier(nn.Module):
    """``head(relu(visual(image)))``; ``visual`` is an open_clip visual tower whose output has ``embed_dim``."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.visual = visual
        self.embed_dim = int(embed_dim)
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.embed_dim, self.num_classes)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The visual tower's features (before the ReLU), like CLIP's ``encode_image``."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, num_classes]``."""
        return self.head(F.relu(self.visual(image)))


def create_supervised(model_name: str, image_px: int | None = None,
                      num_classes: int = NUM_CLASSES) -> SupervisedClassifier:
    """A randomly initialised supervised model with the visual tower of open_clip model ``model_name`` (built by
    :func:`clipgen.models.factory.create_clip`, so a tiny clipgen model or RN50 alike). Under the same torch seed
    its tower starts from the same weights as the CLIP run's (open_clip builds the visual tower first)."""
    from clipgen.models.factory import create_clip, model_config

    embed_dim = int(model_config(model_name)["embed_dim"])
    clip, _ = create_clip(model_name, image_px)
    visual = clip.visual
    del clip  # the text tower is not part of the supervised model
    return SupervisedClassifier(visual, embed_dim, num_classes)


def domainnet_columns(classnames: Sequence[str]) -> list[int]:
    """Output column of each DomainNet class name: 1000 + its DomainNet label. A name that is not one of
    DomainNet's 345 classes is a ClipgenError (the supervised head has no column for it)."""
    from clipgen.facts import domainnet_label

    cols = []
    for name in classnames:
        try:
            cols.append(NUM_IMAGENET_CLASSES + domainnet_label(name))
        except ValueError:
            raise ClipgenError(f"class {name!r} has no column in the supervised head: expected one of DomainNet's "
                               f"345 class names (columns 1000..1344)") from None
    return cols


@torch.no_grad()
def restricted_logits(model: SupervisedClassifier, images: torch.Tensor, columns: Sequence[int]):
    """``(logits[:, columns], features)`` of normalised float ``images``: the zero-shot-equivalent logits over
    the run's classes (in the order of ``columns``) and the tower's features."""
    features = model.visual(images)
    logits = model.head(F.relu(features))
    return logits[:, list(columns)], features


def supervised_outputs(model: SupervisedClassifier, images, classnames: Sequence[str], device="cpu",
                       batch_size: int = 512) -> dict:
    """The zero-shot-equivalent ``{"logits", "preds", "image_embeddings", "logit_scale"}`` over ``classnames``
    (uint8 ``[n, 3, h, w]`` images): logits = head outputs at columns 1000 + DomainNet label, embeddings = the
    normalised tower features."""
    import numpy as np

    from clipgen.models.zeroshot import as_batch

    columns = domainnet_columns(classnames)
    model = model.to(device).eval()
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        lo, f = restricted_logits(model, as_batch(images, start, batch_size, device), columns)
        logits.append(lo.float().cpu())
        feats.append(F.normalize(f.float(), dim=-1).cpu())
    logits = torch.cat(logits).numpy() if logits else np.zeros((0, len(columns)), dtype=np.float32)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, model.embed_dim), dtype=np.float32)
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    return {"logits": logits, "preds": preds, "image_embeddings": emb, "logit_scale": 1.0}


def supervised_payload(model: nn.Module, *, model_name: str, model_cfg: dict, epoch: int, step: int,
                       samples_seen: int, run_name: str, recipe_id: str, seed: int) -> dict:
    """An epoch checkpoint of the supervised model (clipgen/FORMATS.md); save it like CLIP's with
    ``clipgen.train.checkpoint.save_epoch``."""
    from clipgen.models.checkpoint import epoch_payload, unwrap

    payload = epoch_payload(model, model_name=model_name, model_cfg=model_cfg, epoch=epoch, step=step,
                            samples_seen=samples_seen, run_name=run_name, recipe_id=recipe_id, seed=seed)
    payload.update(kind=KIND, num_classes=int(unwrap(model).num_classes))
    return payload
