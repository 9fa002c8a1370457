"""Zero-shot classification as pure functions, in the style of CLIP_benchmark:
``evaluate(model, images, labels, tokenizer, classnames, templates, device) -> dict``, over test images decoded
here as uint8 ``[n, 3, px, px]`` (resized and centre-cropped once, like open_clip's eval transform). The head
itself (templates, class embeddings, logits) is clipgen.models.zeroshot's.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from clipgen.errors import ClipgenError
from clipgen.eval.metrics import lso_metrics, macro_f1, safe_mean, topk_correct, unweighted_accuracy
from clipgen.models.zeroshot import class_embeddings, encode_images, model_logit_scale, zeroshot_logits


# --- images --------------------------------------------------------------------------------------------------
def load_image(path: str, image_px: int) -> np.ndarray:
    """One image as uint8 ``[3, px, px]``: RGB, shorter side resized to ``image_px`` (bicubic), centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = image_px / min(w, h)
            # Resize the shorter side exactly to image_px (rounding could leave it one pixel short).
            size = (image_px, max(image_px, round(h * scale))) if w <= h else (max(image_px, round(w * scale)),
                                                                              image_px)
            if (w, h) != size:
                im = im.resize(size, Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_px) // 2, (h - image_px) // 2
            im = im.crop((left, top, left + image_px, top + image_px))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e}): expected a readable PNG/JPEG file") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_images(paths: Sequence[str], image_px: int, out: np.ndarray | None = None,
                  workers: int | None = None) -> np.ndarray:
    """Decode ``paths`` into uint8 ``[n, 3, px, px]`` (into ``out`` if given, e.g. a disk-backed memmap for
    test sets that do not fit in memory). PIL releases the GIL while decoding and resizing, so threads help."""
    n = len(paths)
    if out is None:
        out = np.empty((n, 3, image_px, image_px), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)

    def _one(i: int) -> None:
        out[i] = load_image(paths[i], image_px)

    if workers <= 1 or n < 64:
        for i in range(n):
            _one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_one, range(n)))  # list() re-raises the first worker error
    return out


# --- the CLIP_benchmark-style entry point --------------------------------------------------------------------
def evaluate(model, images, labels, tokenizer, classnames: Sequence[str], templates: Sequence[str],
             device: str | torch.device = "cpu", batch_size: int = 512, domains: Sequence[str] | None = None,
             heldout: Sequence[str] = (), report_domains: Sequence[str] | None = None,
             tokens: torch.Tensor | None = None) -> dict:
    """Zero-shot classification of ``images`` over ``classnames``.

    Returns ``{"metrics", "logits", "preds", "image_embeddings", "class_embeddings", "logit_scale"}`` (arrays are
    numpy, on the CPU). With ``domains`` (one per image) the metrics are the DomainNet leave-some-out set of
    :func:`clipgen.eval.metrics.lso_metrics` for each of ``report_domains`` (default: the domains present);
    without, the plain ``acc``, ``top5``, ``unweighted-acc``, ``macro-f1`` and ``n`` of all images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != labels.shape[0]:
        raise ClipgenError(f"{len(images)} images but {labels.shape[0]} labels: expected one label per image")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise ClipgenError(f"labels range over [{labels.min()}, {labels.max()}]: expected indices into the "
                           f"{len(classnames)} class names")
    model = model.to(device)
    class_emb = class_embeddings(model, tokenizer, classnames, templates, device, batch_size, tokens)
    image_emb = encode_images(model, images, device, batch_size)
    scale = model_logit_scale(model)
    logits = zeroshot_logits(image_emb, class_emb, scale).cpu().numpy()
    preds = logits.argmax(axis=1) if labels.size else np.zeros(0, dtype=np.int64)
    if domains is not None:
        present = list(dict.fromkeys(domains))
        metrics = lso_metrics(logits, labels, list(domains), list(classnames), list(heldout),
                              report_domains if report_domains is not None else present)
    else:
        metrics = {"acc": safe_mean(preds == labels), "top5": safe_mean(topk_correct(logits, labels, 5)),
                   "unweighted-acc": unweighted_accuracy(preds, labels, range(len(classnames))),
                   "macro-f1": macro_f1(preds, labels, len(classnames)), "n": int(labels.size)}
    return {"metrics": metrics, "logits": logits, "preds": preds, "image_embeddings": image_emb.numpy(),
            "class_embeddings": class_emb.cpu().numpy(), "logit_scale": scale}
