"""The optimiser and the learning-rate schedule (``optim.*``), the same for every objective."""
from __future__ import annotations

import functools
import math

import torch

from clipgen.errors import ClipgenError
from clipgen.models.checkpoint import unwrap

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")


def check_optim_config(oc) -> None:
    if oc.name not in OPTIMIZERS:
        raise ClipgenError(f"unknown optim.name {oc.name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if oc.schedule not in SCHEDULES:
        raise ClipgenError(f"unknown optim.schedule {oc.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    # value ranges (lr > 0, warmup_steps >= 0, ...): clipgen.preflight.check_values


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale (ndim < 2 or a name with
    "bn", "ln", "bias" or "logit_scale"); decay on every other (>= 2-D) weight."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
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
