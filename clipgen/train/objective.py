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
        data.labels = supervised_labels(data.meta, recipe_dir)

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
    from clipgen.facts import imagenet_class_index

    index = {wnid: i for i, (wnid, _) in imagenet_class_index().items()}
    out = []
    for sid, label, source in zip(meta["sample_id"], meta["label"], meta["source"]):
        lab = int(label) if str(label).lstrip("-").isdigit() else -1
        if lab >= 0:
            out.append(NUM_IMAGENET_CLASSES + lab)
            continue
        parts = sid.split("/")
        idx = index.get(parts[1]) if len(parts) > 2 and parts[0] == "base" else None
        if idx is None:
            raise ClipgenError(f"sample {sid!r} (source {source!r}) in {str(where)!r} has no supervised label: "
                               "expected a DomainNet class or an ImageNet wnid (the supervised baseline needs a "
                               "labelled base corpus: data.base=imagenet_captions or world, not cc)")
        out.append(idx)
    return torch.tensor(out, dtype=torch.int64)


OBJECTIVES = {o.name: o for o in (ClipObjective, SupervisedObjective)}  # trainer.objective: the model kinds' names


def check_objective_name(name: str, where: str = "trainer.objective") -> str:
    if name not in OBJECTIVES:
        raise ClipgenError(f"unknown {where} {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


def objective_for(name: str, rank: int = 0, world_size: int = 1) -> Objective:
    return OBJECTIVES[check_objective_name(name)](rank, world_size)
