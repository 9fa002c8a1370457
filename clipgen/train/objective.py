"""What the trainer optimises, one :class:`Objective` per ``trainer.objective``: the contrastive CLIP loss or
the supervised baseline's cross-entropy (protocol §5). An objective is its model kind (clipgen.models.kinds: the
model it builds, the checkpoint payload and the evaluation head, shared with the stages that load models) plus
the training half that differs between the two: what its batches need (tokens or labels), the forward +
backward of one batch and the statistic logged every step. The trainer asks it (``objective_for(name)``)
instead of branching on the name.

Micro-batches (``trainer.accum_steps``) keep the contrastive loss a loss over the whole batch (open_clip's
``accum_freq`` idea): the features of every micro-batch are first computed without gradients; then each
micro-batch is run again with gradients and the loss over all features (its own live, the others cached) is
back-propagated. The parameter gradients add up to the full-batch gradient; the logit scale takes part only in
the first micro-batch's loss so that its gradient is counted once. (BatchNorm, as in any micro-batching, sees
micro-batch statistics.) The supervised loss is a mean over samples, so its micro-batches are weighted by their
share of the batch. Under DDP, micro-batches before the last skip the gradient all-reduce (``no_sync``).
"""
from __future__ import annotations

import abc
import contextlib
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from clipgen.errors import ClipgenError
from clipgen.models.checkpoint import unwrap
from clipgen.models.kinds import ClipModel, ModelKind, SupervisedModel
from clipgen.models.supervised import NUM_IMAGENET_CLASSES

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to at most 100


def _no_sync(model, last: bool):
    return model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()


class Objective(ModelKind):
    """The interface; see the module docstring. ``stat`` names the per-step statistic (logged as
    ``train/{stat}``); ``name``, ``text_head``, ``create_model``, ``payload`` and ``outputs`` are the model
    kind's."""

    stat = ""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = int(rank), int(world_size)

    def check(self, cfg) -> None:
        """Settings this objective cannot train with: a one-line ClipgenError."""

    def prepare_data(self, data, recipe_dir) -> None:
        """Give the training data what this objective's batches need beyond images and tokens."""

    @abc.abstractmethod
    def backward(self, model, images, batch, accum: int, amp_ctx, scale_loss) -> tuple[float, float]:
        """Forward + backward over the batch in ``accum`` micro-batches; returns (loss, statistic)."""

    def after_step(self, model) -> None:
        """Called after every optimizer step."""


class ClipObjective(ClipModel, Objective):
    """Contrastive loss of open_clip (paper: local loss with gather-with-grad, no-ops in one process)."""

    stat = "logit_scale"

    @functools.cached_property
    def loss_fn(self):  # built on first use: config checks build objectives that never train
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=self.rank,
                        world_size=self.world_size)

    def backward(self, model, images, batch, accum, amp_ctx, scale_loss):
        """Returns (loss, logit scale)."""
        tokens, loss_fn = batch.tokens, self.loss_fn
        if accum == 1:
            with amp_ctx():
                out = model(images, tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            scale_loss(loss).backward()
            return loss.item(), float(out["logit_scale"].detach())
        chunks = list(zip(images.chunk(accum), tokens.chunk(accum)))
        with torch.no_grad(), amp_ctx():
            cached = [model(i, t) for i, t in chunks]
        img = [c["image_features"] for c in cached]
        txt = [c["text_features"] for c in cached]
        for j, (i, t) in enumerate(chunks):
            with _no_sync(model, j == len(chunks) - 1):
                with amp_ctx():
                    out = model(i, t)
                    scale = out["logit_scale"] if j == 0 else out["logit_scale"].detach()
                    loss = loss_fn(torch.cat(img[:j] + [out["image_features"]] + img[j + 1:]),
                                   torch.cat(txt[:j] + [out["text_features"]] + txt[j + 1:]), scale)
                scale_loss(loss).backward()
        # every micro-batch computes the same full-batch loss value: read it once
        return loss.item(), float(out["logit_scale"].detach())

    def after_step(self, model):
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class SupervisedObjective(SupervisedModel, Objective):
    """Mean cross-entropy of clipgen.models.supervised's 1345-way classifier."""

    stat = "acc"

    def check(self, cfg):
        if cfg.eval.during_training:
            raise ClipgenError("eval.during_training=true is a zero-shot CLIP evaluation: expected it off for "
                               "trainer.objective=supervised (clipgen-eval evaluates supervised checkpoints)")

    def prepare_data(self, data, recipe_dir):
        data.labels = data_labels(data, recipe_dir)

    def backward(self, model, images, batch, accum, amp_ctx, scale_loss):
        """Returns (loss, top-1 accuracy)."""
        n, loss_sum, correct = images.shape[0], 0.0, 0
        chunks = list(zip(images.chunk(accum), batch.labels.chunk(accum)))
        for j, (i, y) in enumerate(chunks):
            with _no_sync(model, j == len(chunks) - 1):
                with amp_ctx():
                    logits = model(i)
                    loss = F.cross_entropy(logits.float(), y, reduction="sum") / n
                scale_loss(loss).backward()
            loss_sum += loss.item()
            correct += int((logits.argmax(dim=1) == y).sum())
        return loss_sum, correct / n


def supervised_labels(meta: dict[str, list[str]], where) -> torch.Tensor:
    """Training targets (protocol §5) from the shards' metadata: 1000 + DomainNet label for every sample of a
    DomainNet class (DomainNet images, and base images whose ImageNet class maps to DomainNet), else the ImageNet
    index of the base image's wnid (``base/{wnid}/...``). A sample with neither (CC pairs have no class) is a
    ClipgenError naming it."""
    from clipgen.data.sampleindex import imagenet_wnid_index

    index = imagenet_wnid_index()
    labels = np.array([int(v) if str(v).lstrip("-").isdigit() else -1 for v in meta["label"]], dtype=np.int64)
    imagenet = np.array([_wnid_index(sid, index) for sid in meta["sample_id"]], dtype=np.int64)
    return targets_from(labels, imagenet, lambda i: (meta["sample_id"][i], meta["source"][i]), where)


def _wnid_index(sample_id: str, index: dict[str, int]) -> int:
    parts = sample_id.split("/")
    return index.get(parts[1], -1) if len(parts) > 2 and parts[0] == "base" else -1


def targets_from(labels: np.ndarray, imagenet: np.ndarray, describe, where) -> torch.Tensor:
    """1000 + label where a sample has a DomainNet label, else its ImageNet index; ``describe(i)`` gives (sample
    id, source) of the first sample with neither, for the error."""
    missing = np.flatnonzero((labels < 0) & (imagenet < 0))
    if len(missing):
        sid, source = describe(int(missing[0]))
        raise ClipgenError(f"sample {sid!r} (source {source!r}) in {str(where)!r} has no supervised label: "
                           "expected a DomainNet class or an ImageNet wnid (the supervised baseline needs a "
                           "labelled base corpus: data.base=imagenet_captions or world, not cc)")
    return torch.from_numpy(np.where(labels >= 0, NUM_IMAGENET_CLASSES + labels, imagenet))


def data_labels(data, where) -> torch.Tensor:
    """Supervised targets of a loader's data: from the sample index's columns when streamed (nothing per sample
    in Python), from the decoded metadata in memory."""
    if hasattr(data, "label_columns"):
        labels, imagenet = data.label_columns()
        return targets_from(labels, imagenet, lambda i: (data.sample_id(i), data.value(i, "source")), where)
    return supervised_labels(data.meta, where)


OBJECTIVES = {o.name: o for o in (ClipObjective, SupervisedObjective)}  # trainer.objective: the model kinds' names


def check_objective_name(name: str, where: str = "trainer.objective") -> str:
    if name not in OBJECTIVES:
        raise ClipgenError(f"unknown {where} {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


def objective_for(name: str, rank: int = 0, world_size: int = 1) -> Objective:
    return OBJECTIVES[check_objective_name(name)](rank, world_size)
