"""A checkpoint's evaluation outputs: the one owner of their arrays and keys (their paths are clipgen.rundir's).

    {run}/eval/outputs/epoch_NNN.npz               KEYS: sample_ids, domains, labels (index into the run's
                                                   classes), preds, logits (f16), image_embeddings (f16, L2-
                                                   normalised), logit_scale (logits = logit_scale x cosine, so
                                                   their softmax is the model's probabilities)
    {run}/eval/outputs/epoch_NNN.imagenet-val.npz  IMAGENET_KEYS: sample_ids (paths relative to the val root),
                                                   labels, top5 (ImageNet indices, best first)

Written by clipgen-eval (compressed, atomically); read by the report's concentration table, the analyses and the
diffing tool, each asking for the keys it needs.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_bytes

@dataclass
class Outputs:
    """The arrays of an outputs file that were asked for (the others None)."""
    sample_ids: np.ndarray | None = None
    domains: np.ndarray | None = None
    labels: np.ndarray | None = None
    preds: np.ndarray | None = None
    logits: np.ndarray | None = None
    image_embeddings: np.ndarray | None = None
    logit_scale: np.ndarray | None = None
    top5: np.ndarray | None = None


KEYS = ("sample_ids", "domains", "labels", "preds", "logits", "image_embeddings", "logit_scale")
IMAGENET_KEYS = ("sample_ids", "labels", "top5")


def _write(path: Path, arrays: dict, compressed: bool = True) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save(path: str | Path, sample_ids, domains, labels, preds, logits, image_embeddings, logit_scale,
         compressed: bool = True) -> None:
    """One checkpoint's outputs on the DomainNet test images (a model kind's head gives preds, logits,
    image_embeddings and logit_scale: ``save(path, ids, domains, labels, **head_outputs)``)."""
    arrays = Outputs(sample_ids=np.asarray(sample_ids), domains=np.asarray(domains), labels=np.asarray(labels),
                     preds=np.asarray(preds).astype(np.int64), logits=np.asarray(logits).astype(np.float16),
                     image_embeddings=np.asarray(image_embeddings).astype(np.float16),
                     logit_scale=np.float32(logit_scale))
    _write(Path(path), {k: getattr(arrays, k) for k in KEYS}, compressed)


def save_imagenet(path: str | Path, sample_ids, labels, logits: np.ndarray) -> None:
    """ImageNet val outputs: the top-5 predictions, not the 1000 logits per image."""
    k = min(5, logits.shape[1])
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int16)
    arrays = Outputs(sample_ids=np.asarray(sample_ids), labels=np.asarray(labels), top5=top5)
    _write(Path(path), {k: getattr(arrays, k) for k in IMAGENET_KEYS})


def load(path: str | Path, keys: tuple[str, ...] = KEYS) -> Outputs:
    """The arrays ``keys`` of an outputs file; a ClipgenError naming the file when it is unreadable or lacks one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ClipgenError(f"{path}: arrays {missing} missing (expected {', '.join(keys)})")
            return Outputs(**{k: z[k] for k in keys})
    except (OSError, ValueError, EOFError) as e:
        raise ClipgenError(f"{path}: not a readable npz ({e})") from None
