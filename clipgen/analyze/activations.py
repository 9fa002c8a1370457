"""Visual-tower layers of open_clip models: forward hooks that record every requested layer in one forward pass,
and the tower cut into consecutive stages so an analysis can run it from any layer on (circuits).

Layers (names are stable; they key the caches and the results):

- ModifiedResNet (RN50, clipgen-tiny-rn): ``stem`` (output of the 3-conv stem after its average pool),
  ``layer{i}.{j}`` (every residual block), ``attnpool`` (the attention pool = the unnormalised image embedding).
- VisionTransformer (ViT-*, clipgen-tiny-vit): ``block{i}`` (every residual attention block), ``head`` (pooled,
  normalised by ln_post and projected = the unnormalised image embedding).

A layer's activation is reduced to one value per channel: the mean over spatial positions (conv maps) or tokens
(transformer blocks); the last layer is already a vector. The composition of :func:`stages` reproduces
``visual(x)``; a test pins that down.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_bytes

log = logging.getLogger("clipgen.analyze")


def _kind(visual) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        return "vit"
    raise ClipgenError(f"visual tower {type(visual).__name__} is not supported by clipgen-analyze: expected "
                       "open_clip's ModifiedResNet (RN50, clipgen-tiny-rn) or VisionTransformer (ViT-*)")


def layer_modules(visual) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every analysable layer in forward order; a hook on the module sees its output."""
    if _kind(visual) == "resnet":
        out = [("stem", visual.avgpool)]  # the stem is a method; its last op is this pool
        for i in range(1, 5):
            for j, block in enumerate(getattr(visual, f"layer{i}")):
                out.append((f"layer{i}.{j}", block))
        out.append(("attnpool", visual.attnpool))
        return out
    out = [(f"block{i}", blk) for i, blk in enumerate(visual.transformer.resblocks)]
    return out + [("head", visual)]  # the tower's own output: pooled, ln_post, projected


def layer_names(visual) -> list[str]:
    return [n for n, _ in layer_modules(visual)]


def _pool(name: str, out, visual) -> torch.Tensor:
    """Per-channel summary ``[batch, channels]`` of one layer's output."""
    if isinstance(out, tuple):
        out = out[0]
    if out.dim() == 4:  # conv map [B, C, H, W]
        return out.mean(dim=(2, 3))
    if out.dim() == 3:  # transformer tokens: NLD or LND
        batch_first = getattr(getattr(visual, "transformer", None), "batch_first", True)
        return out.mean(dim=1) if batch_first else out.mean(dim=0)
    return out


def check_layers(visual, layers: Sequence[str] | None) -> list[str]:
    names = layer_names(visual)
    if not layers:
        return names
    bad = [n for n in layers if n not in names]
    if bad:
        raise ClipgenError(f"unknown layer(s) {bad} for this visual tower: expected some of {names}")
    return [n for n in names if n in set(layers)]  # forward order


@torch.no_grad()
def extract(model, images, layers: Sequence[str] | None = None, batch_size: int = 256,
            device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Per-channel activations ``{layer: float32 [n, channels]}`` of every requested layer, all recorded by hooks
    during ONE forward pass per batch. ``images`` is uint8 ``[n, 3, px, px]`` (normalised here per batch)."""
    from clipgen.models.zeroshot import normalize_images

    visual = model.visual if hasattr(model, "visual") else model
    visual = visual.to(device).eval()
    wanted = check_layers(visual, layers)  # forward order, which the returned dict keeps
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    handles = []

    def hook(name):
        def fn(_module, _inp, out):
            chunks[name].append(_pool(name, out, visual).float().cpu())
        return fn

    try:
        for name, module in layer_modules(visual):
            if name in wanted:
                handles.append(module.register_forward_hook(hook(name)))
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            batch = batch.to(device)
            visual(normalize_images(batch) if batch.dtype == torch.uint8 else batch)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(c).numpy() if c else np.zeros((0, 0), np.float32) for n, c in chunks.items()}


def extract_one_pass_per_layer(model, images, layers: Sequence[str] | None = None, batch_size: int = 256,
                               device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """The naive way (one full forward pass per layer); kept as the benchmark's baseline and as a test oracle."""
    visual = model.visual if hasattr(model, "visual") else model
    return {n: extract(model, images, [n], batch_size, device)[n] for n in check_layers(visual, layers)}


# --- stages: run the tower from any layer on ------------------------------------------------------------------
def stages(visual) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """``(layer name, fn)`` in order: fn maps the previous layer's full activation (the image for the first) to
    this layer's full activation; composing all of them gives ``visual(image)``."""
    if _kind(visual) == "resnet":
        out: list[tuple[str, Callable]] = [("stem", visual.stem)]
        for i in range(1, 5):
            for j, block in enumerate(getattr(visual, f"layer{i}")):
                out.append((f"layer{i}.{j}", block))
        out.append(("attnpool", visual.attnpool))
        return out
    batch_first = getattr(visual.transformer, "batch_first", True)

    def block_fn(blk):
        if batch_first:
            return lambda x: blk(x)
        return lambda x: blk(x.transpose(0, 1)).transpose(0, 1)

    blocks = list(visual.transformer.resblocks)
    out = [("block0", lambda x, b=blocks[0]: block_fn(b)(visual._embeds(x)))]
    out += [(f"block{i}", block_fn(b)) for i, b in enumerate(blocks) if i > 0]

    def head(x):
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    return out + [("head", head)]


def channel_sum(act: torch.Tensor, visual) -> torch.Tensor:
    """Sum of a full activation over positions/tokens: ``[batch, channels]`` (the node value of a channel)."""
    if act.dim() == 4:
        return act.sum(dim=(2, 3))
    if act.dim() == 3:
        return act.sum(dim=1)  # stages keep transformer activations batch-first
    return act


# --- cache ---------------------------------------------------------------------------------------------------
def cache_key(checkpoint_sha256: str, sample_ids: Sequence[str], layers: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(checkpoint_sha256.encode())
    h.update("\n".join(map(str, sample_ids)).encode())
    h.update(("|" + ",".join(layers)).encode())
    return h.hexdigest()[:16]


def cached_extract(cache_dir: Path, checkpoint_sha256: str, sample_ids: Sequence[str], layers: Sequence[str],
                   compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Activations from ``{cache_dir}/acts-{key}.npz`` (key = checkpoint sha256 + sample ids + layers), computed
    by ``compute()`` and written atomically when missing or unreadable."""
    path = Path(cache_dir) / f"acts-{cache_key(checkpoint_sha256, sample_ids, layers)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if all(f"layer:{n}" in z.files for n in layers) and len(z["sample_ids"]) == len(sample_ids):
                    return {n: z[f"layer:{n}"] for n in layers}
        except (OSError, ValueError, KeyError):
            log.warning("%s is unreadable; recomputing it", path)
    acts = compute()
    buf = io.BytesIO()
    np.savez(buf, sample_ids=np.asarray(sample_ids), **{f"layer:{n}": acts[n] for n in layers})
    atomic_write_bytes(path, buf.getvalue())
    return acts
