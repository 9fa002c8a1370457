"""What the trainer optimises, one :class:`Objective` per ``trainer.objective``: the contrastive CLIP loss or
the supervised baseline's cross-entropy (protocol §5). An objective owns everything that differs between the two:
the model it builds, what its batches need (tokens or labels), the forward + backward of one batch, the
statistic logged every step, the checkpoint payload and the evaluation head. The trainer and the evaluation
ask it (``objective_for(name)``) instead of branching on the name.

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
from clipgen.train import checkpoint as ckpt

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to at most 100


def _no_sync(model, last: bool):
    return model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()


class Objective(abc.ABC):
    """The interface; see the module docstring. ``stat`` names the per-step statistic (logged as
    ``train/{stat}``); ``text_head`` says whether evaluation uses CLIP's zero-shot text head (prompt templates,
    ImageNet's 1000 classes) rather than a classifier's columns."""

    name = ""
    stat = ""
    text_head = False

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = int(rank), int(world_size)

    def check(self, cfg) -> None:
        """Settings this objective cannot train with: a one-line ClipgenError."""

    @abc.abstractmethod
    def create_model(self, model_name: str, image_px: int | None, checkpoint: dict | None = None):
        """``(randomly initialised model, its tokenizer or None)``, shaped like ``checkpoint`` when given."""
        raise NotImplementedError

    def prepare_data(self, data, recipe_dir) -> None:
        """Give the training data what this objective's batches need beyond images and tokens."""

    @abc.abstractmethod
    def backward(self, model, images, batch, accum: int, amp_ctx, scale_loss) -> tuple[float, float]:
        """Forward + backward over the batch in ``accum`` micro-batches; returns (loss, statistic)."""
        raise NotImplementedError

    def after_step(self, model) -> None:
        """Called after every optimizer step."""

    def payload(self, model, **fields) -> dict:
        """An epoch checkpoint (clipgen/FORMATS.md); ``fields`` are those of checkpoint.epoch_payload."""
        return ckpt.epoch_payload(model, **fields)

    @abc.abstractmethod
    def outputs(self, model, tokenizer, images, classnames, templates, device="cpu", batch_size: int = 512,
                tokens=None) -> dict:
        """Evaluation: ``{"logits", "preds", "image_embeddings", "logit_scale"}`` over ``classnames``."""
        raise NotImplementedError


class ClipObjective(Objective):
    """Contrastive loss of open_clip (paper: local loss with gather-with-grad, no-ops in one process)."""

    name, stat, text_head = "clip", "logit_scale", True

    @functools.cached_property
    def loss_fn(self):  # built on first use: evaluation asks this objective for its head only
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=self.rank,
                        world_size=self.world_size)

    def create_model(self, model_name, image_px, checkpoint=None):
        from clipgen.train.model import create_clip

        return create_clip(model_name, image_px)

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
            ckpt.unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def outputs(self, model, tokenizer, images, classnames, templates, device="cpu", batch_size=512, tokens=None):
        from clipgen.eval.models import clip_outputs

        return clip_outputs(model, tokenizer, images, classnames, templates, device, batch_size, tokens)


class SupervisedObjective(Objective):
    """Mean cross-entropy of clipgen.train.supervised_model's 1345-way classifier."""

    name, stat, text_head = "supervised", "acc", False

    def check(self, cfg):
        if cfg.eval.during_training:
            raise ClipgenError("eval.during_training=true is a zero-shot CLIP evaluation: expected it off for "
                               "trainer.objective=supervised (clipgen-eval evaluates supervised checkpoints)")

    def create_model(self, model_name, image_px, checkpoint=None):
        from clipgen.train.supervised_model import NUM_CLASSES, create_supervised

        num_classes = int((checkpoint or {}).get("num_classes", NUM_CLASSES))
        return create_supervised(model_name, image_px, num_classes), None

    def prepare_data(self, data, recipe_dir):
        from clipgen.train.supervised_model import supervised_labels

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

    def payload(self, model, **fields):
        from clipgen.train.supervised_model import supervised_payload

        return supervised_payload(model, **fields)

    def outputs(self, model, tokenizer, images, classnames, templates, device="cpu", batch_size=512, tokens=None):
        from clipgen.eval.models import supervised_outputs

        return supervised_outputs(model, images, classnames, device, batch_size)


OBJECTIVES = {o.name: o for o in (ClipObjective, SupervisedObjective)}  # trainer.objective / meta.json model_kind


def check_objective_name(name: str, where: str = "trainer.objective") -> str:
    if name not in OBJECTIVES:
        raise ClipgenError(f"unknown {where} {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return name


def objective_for(name: str, rank: int = 0, world_size: int = 1) -> Objective:
    return OBJECTIVES[check_objective_name(name)](rank, world_size)
