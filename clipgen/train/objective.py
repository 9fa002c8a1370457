"""What one optimisation step computes: the contrastive CLIP loss or the supervised baseline's cross-entropy,
optionally over micro-batches (``trainer.accum_steps``), plus the optimiser and learning-rate schedule.

Micro-batches keep the contrastive loss a loss over the whole batch (open_clip's ``accum_freq`` idea): the
features of every micro-batch are first computed without gradients; then each micro-batch is run again with
gradients and the loss over all features (its own live, the others cached) is back-propagated. The parameter
gradients add up to the full-batch gradient; the logit scale takes part only in the first micro-batch's loss so
that its gradient is counted once. (BatchNorm, as in any micro-batching, sees micro-batch statistics.) The
supervised loss is a mean over samples, so its micro-batches are weighted by their share of the batch.

Under DDP, micro-batches before the last skip the gradient all-reduce (``no_sync``).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from clipgen.errors import ClipgenError
from clipgen.train import checkpoint as ckpt

OBJECTIVES = ("clip", "supervised")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")


def check_trainer_config(tc, oc) -> None:
    if tc.objective not in OBJECTIVES:
        raise ClipgenError(f"unknown trainer.objective {tc.objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if oc.name not in OPTIMIZERS:
        raise ClipgenError(f"unknown optim.name {oc.name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if oc.schedule not in SCHEDULES:
        raise ClipgenError(f"unknown optim.schedule {oc.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    for key in ("accum_steps", "save_every_epochs"):
        if int(tc[key]) < 1:
            raise ClipgenError(f"trainer.{key}={tc[key]}: expected a positive integer")
    from clipgen.train.checkpoint import CHECKPOINT_DTYPES

    if tc.checkpoint_dtype not in CHECKPOINT_DTYPES:
        raise ClipgenError(f"unknown trainer.checkpoint_dtype {tc.checkpoint_dtype!r}: expected one of "
                           f"{', '.join(CHECKPOINT_DTYPES)}")
    if int(oc.warmup_steps) < 0:
        raise ClipgenError(f"optim.warmup_steps={oc.warmup_steps}: expected 0 or more")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale (ndim < 2 or a name with
    "bn", "ln", "bias" or "logit_scale"); decay on every other (>= 2-D) weight."""
    decay, no_decay = [], []
    for name, p in ckpt.unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: torch.nn.Module, oc) -> torch.optim.Optimizer:
    groups = param_groups(model, float(oc.weight_decay))
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=float(oc.lr), momentum=float(oc.momentum), nesterov=bool(oc.nesterov))
    return torch.optim.AdamW(groups, lr=float(oc.lr), betas=(float(oc.beta1), float(oc.beta2)), eps=float(oc.eps))


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine to 0 at ``total`` (open_clip's cosine_lr)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span)) * base_lr


def step_lr_at(step: int, base_lr: float, warmup: int, steps_per_epoch: int, milestones, gamma: float) -> float:
    """Linear warmup, then ``base_lr`` x ``gamma`` per milestone epoch reached (torch's MultiStepLR by epoch)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    epoch = step // steps_per_epoch
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= int(m))


def schedule(oc, steps_per_epoch: int, total: int):
    """``step -> lr`` for the configured schedule."""
    if oc.schedule == "step":
        return functools.partial(step_lr_at, base_lr=float(oc.lr), warmup=int(oc.warmup_steps),
                                 steps_per_epoch=steps_per_epoch, milestones=list(oc.milestones),
                                 gamma=float(oc.gamma))
    return functools.partial(lr_at, base_lr=float(oc.lr), warmup=int(oc.warmup_steps), total=total)


def _no_sync(model, last: bool):
    return model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()


def clip_backward(model, loss_fn, images, tokens, accum: int, amp_ctx, scale_loss) -> tuple[float, float]:
    """Forward + backward of the contrastive loss over the batch; returns (loss, logit scale)."""
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


def supervised_backward(model, images, labels, accum: int, amp_ctx, scale_loss) -> tuple[float, float]:
    """Forward + backward of the mean cross-entropy over the batch; returns (loss, top-1 accuracy)."""
    n, loss_sum, correct = images.shape[0], 0.0, 0
    chunks = list(zip(images.chunk(accum), labels.chunk(accum)))
    for j, (i, y) in enumerate(chunks):
        with _no_sync(model, j == len(chunks) - 1):
            with amp_ctx():
                logits = model(i)
                loss = F.cross_entropy(logits.float(), y, reduction="sum") / n
            scale_loss(loss).backward()
        loss_sum += loss.item()
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum, correct / n


@contextlib.contextmanager
def _bn_stats_frozen(module: torch.nn.Module):
    """BatchNorm layers of ``module`` normalise as usual but leave their running statistics alone (momentum 0,
    batch counter restored): a checkpointed block's recomputation must not count the batch a second time."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _checkpointed(block: torch.nn.Module):
    from torch.utils.checkpoint import checkpoint

    plain = block.forward

    def forward(x):
        return checkpoint(plain, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _bn_stats_frozen(block)))
    return forward


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """open_clip's checkpointing for transformers; for ModifiedResNet towers (where open_clip's is a no-op),
    every bottleneck recomputes its activations in backward, without updating BatchNorm statistics twice.
    Parameter and buffer names are unchanged."""
    from open_clip.modified_resnet import Bottleneck

    bare = ckpt.unwrap(model)
    if hasattr(bare, "set_grad_checkpointing"):
        bare.set_grad_checkpointing(True)
    visual = getattr(bare, "visual", None)
    for m in (visual.modules() if visual is not None else ()):
        if isinstance(m, Bottleneck):
            m.forward = _checkpointed(m)
