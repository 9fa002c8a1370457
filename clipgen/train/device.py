"""Where and how the model runs: the device, the precision, and the wrappers put around the model once it is
built (and resumed): channels-last memory, gradient checkpointing, DDP, torch.compile. None of them changes a
parameter or buffer name, so checkpoints look the same whichever are on."""
from __future__ import annotations

import contextlib

import torch

from clipgen.errors import ClipgenError
from clipgen.models.checkpoint import unwrap
from clipgen.train import dist

PRECISIONS = ("fp32", "bf16", "amp")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipgenError("trainer.device=cuda but no CUDA device is available: expected trainer.device=cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ClipgenError(f"unknown trainer.device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """fp32: nothing; bf16: autocast on CPU or CUDA; amp: fp16 autocast, CUDA only (it needs a GradScaler)."""
    if precision not in PRECISIONS:
        raise ClipgenError(f"unknown trainer.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "amp" and device.type != "cuda":
        raise ClipgenError(f"trainer.precision=amp needs CUDA (fp16 + GradScaler), but the device is "
                           f"{device.type}: use trainer.precision=bf16 or fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def wrap_for_training(model: torch.nn.Module, tc, denv: dist.DistEnv, device: torch.device) -> torch.nn.Module:
    """``trainer.channels_last``, ``grad_checkpointing``, DDP (under torchrun/srun) and ``compile``. Called after
    any resume, so that every replica starts from the same weights."""
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.grad_checkpointing:
        enable_grad_checkpointing(model)
    if denv.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)
    return model


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

    bare = unwrap(model)
    if hasattr(bare, "set_grad_checkpointing"):
        bare.set_grad_checkpointing(True)
    visual = getattr(bare, "visual", None)
    for m in (visual.modules() if visual is not None else ()):
        if isinstance(m, Bottleneck):
            m.forward = _checkpointed(m)
