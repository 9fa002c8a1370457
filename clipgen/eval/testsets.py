"""The images every evaluation task classifies, decoded once per evaluation and shared by all checkpoints.

- ``domainnet-{D}``: the test split of real and the run's test domain D, over the run's classes (protocol §6). A
  natural-only run does not depend on D, so it gets one task per test domain; tasks are masks over one set.
- a fixed per-(domain, class) subset of those images for the cheap evaluation during training
  (:func:`subset_indices`: at most k images per group, picked by a stable hash of the sample id).
- ``imagenet-val``: ImageNet's validation images in the usual ``{root}/{wnid}/*.JPEG`` layout, 1000-way with
  open_clip's ImageNet class names, when ``eval.imagenet_val_root`` is set.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from clipgen.errors import ClipgenError
from clipgen.facts import NATURAL_DOMAIN, TEST_DOMAINS

log = logging.getLogger("clipgen.eval")

IMAGENET_TASK = "imagenet-val"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Above this many bytes of decoded uint8 pixels a test set is kept in a disk-backed memmap (DomainNet's
# real + D test split at 224 px is ~10 GB, ImageNet val ~7.5 GB) instead of in memory.
IN_MEMORY_LIMIT = 2 << 30


@dataclass
class EvalSet:
    """The test images of every task of a run, decoded once and shared by all checkpoints and tasks."""

    sample_ids: np.ndarray
    domains: np.ndarray
    labels: np.ndarray  # index into the run's classes
    images: np.ndarray  # uint8 [n, 3, px, px]
    tasks: dict[str, tuple[str, np.ndarray]]  # task name -> (test domain D, boolean mask of its images)


def task_name(test_domain: str) -> str:
    return f"domainnet-{test_domain}"


def task_domains(meta: dict) -> list[str]:
    """Test domains a run is evaluated on: its own D; a natural-only run is the same run for every D (its recipe
    id does not name one), so it is evaluated on all of them and appears in every test domain's figure."""
    if meta.get("recipe_kind") == "natural_only":
        return [meta["test_domain"]] + [d for d in TEST_DOMAINS if d != meta["test_domain"]]
    return [meta["test_domain"]]


def select_test_samples(run_cfg: DictConfig, meta: dict, meta_path: Path | str, domains: list[str]):
    """Index samples of the test split of real and ``domains`` over the run's classes, in index order."""
    from clipgen.data.sources import domainnet_index
    from clipgen.world.generate import ensure_world

    classes = list(meta["classes"])
    ensure_world(run_cfg)  # a run of the synthetic world evaluated where its world is not (yet) generated
    index = domainnet_index(run_cfg)
    available = {s.class_name for s in index}
    missing = [c for c in classes if c not in available]
    if missing:
        raise ClipgenError(f"{meta_path} lists classes {missing[:5]}{' ...' if len(missing) > 5 else ''} that the "
                           f"run's data has no images of: expected meta classes to be a subset of the "
                           f"{len(available)} classes of the data the run was trained on")
    keep, wanted = set(classes), {NATURAL_DOMAIN, *domains}
    picked = [s for s in index if s.split == "test" and s.domain in wanted and s.class_name in keep]
    for d in domains:
        if not any(s.domain == d for s in picked):
            raise ClipgenError(f"no test images of domain {d!r} and the run's classes in its data: expected the "
                               f"test split of {NATURAL_DOMAIN} and {d}")
    return picked


def subset_indices(sample_ids: Sequence[str], domains: Sequence[str], labels: Sequence[int],
                   per_group: int) -> np.ndarray:
    """Sorted indices of at most ``per_group`` samples per (domain, label): those with the smallest
    sha256 of their sample id. Depends only on the ids, so it is the same subset in every epoch, process and
    run of a recipe, and adding images to a group changes it only where a new id hashes lower."""
    if per_group < 1:
        raise ClipgenError(f"eval.subset_per_class={per_group}: expected a positive number of images per class "
                           "and domain")
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for i, (sid, dom, lab) in enumerate(zip(sample_ids, domains, labels)):
        digest = hashlib.sha256(f"clipgen-eval-subset:{sid}".encode("utf-8")).hexdigest()
        groups.setdefault((str(dom), int(lab)), []).append((digest, i))
    keep = [i for members in groups.values() for _, i in sorted(members)[:per_group]]
    return np.array(sorted(keep), dtype=np.int64)


def _decode(paths: list[str], image_px: int, cache_dir: Path | None, name: str) -> np.ndarray:
    from clipgen.eval.images import decode_images

    n, out = len(paths), None
    if cache_dir is not None and n * 3 * image_px * image_px > IN_MEMORY_LIMIT:
        out = np.memmap(Path(cache_dir) / f"{name}.u8", dtype=np.uint8, mode="w+", shape=(n, 3, image_px, image_px))
    return decode_images(paths, image_px, out=out)


def load_eval_set(run_cfg: DictConfig, meta: dict, meta_path: Path | str, image_px: int,
                  cache_dir: Path | None = None, per_group: int | None = None) -> EvalSet:
    """The DomainNet test images of every task of the run; with ``per_group``, only the fixed subset of
    :func:`subset_indices` (chosen before decoding, so a subset costs only its own images)."""
    domains = task_domains(meta)
    picked = select_test_samples(run_cfg, meta, meta_path, domains)
    index = {c: i for i, c in enumerate(meta["classes"])}
    labels = np.array([index[s.class_name] for s in picked], dtype=np.int64)
    if per_group is not None:
        keep = subset_indices([s.sample_id for s in picked], [s.domain for s in picked], labels, per_group)
        picked, labels = [picked[i] for i in keep], labels[keep]
    images = _decode([s.path for s in picked], image_px, cache_dir, "images")
    dom = np.array([s.domain for s in picked])
    tasks = {task_name(d): (d, np.isin(dom, [NATURAL_DOMAIN, d])) for d in domains}
    return EvalSet(sample_ids=np.array([s.sample_id for s in picked]), domains=dom, labels=labels, images=images,
                   tasks=tasks)


# --- ImageNet val --------------------------------------------------------------------------------------------
def imagenet_classnames() -> list[str]:
    """open_clip's 1000 ImageNet class names (the prompts' spelling), in ImageNet index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_val_samples(root: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(paths, labels)`` of ``{root}/{wnid}/*.{JPEG,jpg,png}``, label = ImageNet index of the wnid, in label then
    file-name order. A partial val folder (some wnids) is fine; folders that are not wnids are ignored with a
    warning; no image at all is a ClipgenError."""
    from clipgen.facts import imagenet_class_index

    root = Path(os.path.expanduser(str(root)))
    layout_hint = "ImageNet val as {root}/{wnid}/*.JPEG (e.g. n01440764/ILSVRC2012_val_00000293.JPEG)"
    if not root.is_dir():
        raise ClipgenError(f"eval.imagenet_val_root={str(root)!r} is not a directory: expected {layout_hint}")
    wnid_to_label = {wnid: i for i, (wnid, _) in imagenet_class_index().items()}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in wnid_to_label]
    if unknown:
        log.warning("eval.imagenet_val_root: ignoring %d folders that are not ImageNet wnids (e.g. %s)",
                    len(unknown), unknown[:3])
    pairs = []
    for folder in folders:
        label = wnid_to_label.get(folder.name)
        if label is None:
            continue
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        pairs.extend((label, str(f)) for f in files)
    if not pairs:
        raise ClipgenError(f"eval.imagenet_val_root={str(root)!r} holds no images under ImageNet wnid folders: "
                           f"expected {layout_hint}")
    pairs.sort()
    return [p for _, p in pairs], np.array([lab for lab, _ in pairs], dtype=np.int64)


@dataclass
class ImagenetSet:
    sample_ids: np.ndarray  # path relative to the val root, e.g. "n01440764/ILSVRC2012_val_00000293.JPEG"
    labels: np.ndarray  # ImageNet index 0..999
    images: np.ndarray  # uint8 [n, 3, px, px]


def load_imagenet_set(root: str | os.PathLike, image_px: int, cache_dir: Path | None = None,
                      samples: tuple[list[str], np.ndarray] | None = None) -> ImagenetSet:
    """Decode the val images (``samples``: an earlier :func:`imagenet_val_samples` of ``root``)."""
    paths, labels = samples if samples is not None else imagenet_val_samples(root)
    base = Path(os.path.expanduser(str(root)))
    ids = np.array([str(Path(p).relative_to(base)) for p in paths])
    return ImagenetSet(sample_ids=ids, labels=labels, images=_decode(paths, image_px, cache_dir, "imagenet"))


def imagenet_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """``imagenet-top1``, ``imagenet-top5`` (sample-weighted over the val images given) and ``imagenet-n``."""
    from clipgen.eval.metrics import accuracy, topk_correct

    logits = np.asarray(logits)
    preds = logits.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    return {"imagenet-top1": accuracy(preds == labels), "imagenet-top5": accuracy(topk_correct(logits, labels, 5)),
            "imagenet-n": int(len(labels))}
