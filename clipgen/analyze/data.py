"""What the analyses look at: a trained run's checkpoint, its zero-shot head, and the test images of every domain.

The evaluation task classifies the test split of real and D only (clipgen.eval.testsets); the analyses compare
all six domains, so they read the test split of every domain over the run's classes from the run's own data
(its config.yaml names the world / DomainNet root), at most ``per_group`` images per domain x class chosen by a
seeded hash of the sample id (nested: a smaller ``per_group`` picks a subset of a larger one).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS

log = logging.getLogger("clipgen.analyze")


@dataclass
class RunInfo:
    run_dir: Path
    meta: dict
    run_cfg: object
    epoch: int
    checkpoint: Path
    eval_outputs: Path | None  # eval/outputs/epoch_NNN.npz of that epoch, if evaluated

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def heldout_idx(self) -> list[int]:
        held = set(self.meta["heldout_classes"])
        return [i for i, c in enumerate(self.classes) if c in held]

    @property
    def other_idx(self) -> list[int]:
        held = set(self.heldout_idx)
        return [i for i in range(len(self.classes)) if i not in held]


def load_run(run_dir: Path, epoch: int = -1) -> RunInfo:
    """The run's meta, config and the checkpoint to analyse (``epoch`` -1: the last evaluated epoch, else the last
    checkpoint when nothing was evaluated)."""
    run_dir = Path(run_dir)
    if not rundir.is_run(run_dir):
        raise ClipgenError(f"{rundir.meta_path(run_dir)} is missing: expected a run directory written by "
                           "clipgen-train (analysis.run_dirs or paths.root/runs)")
    from clipgen.eval.run import read_run_meta

    meta, _ = read_run_meta(run_dir)
    ckpts = dict(rundir.checkpoints(run_dir))
    if not ckpts:
        raise ClipgenError(f"no checkpoints/epoch_*.pt in {run_dir}: expected a trained run")
    outputs = dict(rundir.outputs(run_dir))
    if epoch < 0:
        evaluated = sorted(set(outputs) & set(ckpts))
        if evaluated:
            epoch = evaluated[-1]
        else:
            epoch = max(ckpts)
            log.warning("%s: no evaluated epoch (eval/outputs/epoch_*.npz); analysing the last checkpoint, epoch %d",
                        run_dir.name, epoch)
    if epoch not in ckpts:
        raise ClipgenError(f"analysis.epochs has {epoch}: {run_dir}/checkpoints has no epoch_{epoch:03d}.pt (epochs "
                           f"{min(ckpts)}..{max(ckpts)}); expected one of them or -1")
    return RunInfo(run_dir, meta, rundir.read_config(run_dir), epoch, ckpts[epoch], outputs.get(epoch))


def _rank_key(seed: int, sample_id: str) -> str:
    return hashlib.sha256(f"clipgen-analyze:{seed}:{sample_id}".encode("utf-8")).hexdigest()


@dataclass
class ImageSet:
    sample_ids: np.ndarray
    domains: np.ndarray
    labels: np.ndarray  # index into the run's classes
    rank: np.ndarray  # position of the image within its domain x class by the seeded hash (0 = first picked)
    images: np.ndarray | None = None  # uint8 [n, 3, px, px] once decoded
    paths: list | None = None

    def decode(self, image_px: int) -> "ImageSet":
        from clipgen.eval.images import decode_images

        if self.images is None:
            self.images = decode_images(self.paths, image_px)
        return self


def select_images(info: RunInfo, split: str, per_group: int, seed: int) -> ImageSet:
    """Images of ``split`` of all six domains over the run's classes, at most ``per_group`` per domain x class."""
    from clipgen.data.sources import domainnet_index
    from clipgen.world.generate import ensure_world

    if per_group < 1:
        raise ClipgenError(f"analysis images per group = {per_group}: expected a positive number")
    classes = {c: i for i, c in enumerate(info.classes)}
    ensure_world(info.run_cfg)
    index = domainnet_index(info.run_cfg)
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    picked = [s for s in index if s.split == split and s.class_name in classes and s.domain in DOMAINS]
    for i, s in enumerate(picked):
        groups.setdefault((s.domain, classes[s.class_name]), []).append((_rank_key(seed, s.sample_id), i))
    keep: dict[int, int] = {}
    for members in groups.values():
        for r, (_, i) in enumerate(sorted(members)[:per_group]):
            keep[i] = r
    order = sorted(keep)
    if not order:
        raise ClipgenError(f"no {split} images of the run's classes in its data ({rundir.config_path(info.run_dir)}): "
                           "expected the DomainNet-layout data the run was trained on")
    return ImageSet(sample_ids=np.array([picked[i].sample_id for i in order]),
                    domains=np.array([picked[i].domain for i in order]),
                    labels=np.array([classes[picked[i].class_name] for i in order], dtype=np.int64),
                    rank=np.array([keep[i] for i in order], dtype=np.int64),
                    paths=[picked[i].path for i in order])


def compare_with_eval(info: RunInfo, sample_ids: np.ndarray, emb: np.ndarray) -> dict | None:
    """Check our embeddings against the ones clipgen-eval saved for the same checkpoint (f16, real + D test):
    the max |difference| over the images both hold. None when the epoch has no saved outputs."""
    if info.eval_outputs is None:
        return None
    from clipgen.eval import outputs

    z = outputs.load(info.eval_outputs, ("sample_ids", "image_embeddings"))
    ids, saved = z.sample_ids, z.image_embeddings.astype(np.float32)
    pos = {str(s): i for i, s in enumerate(ids)}
    common = [(i, pos[str(s)]) for i, s in enumerate(sample_ids) if str(s) in pos]
    if not common:
        return {"images": 0, "max_abs_diff": None}
    ours = np.stack([emb[i] for i, _ in common])
    theirs = np.stack([saved[j] for _, j in common])
    diff = float(np.abs(ours - theirs).max())
    if diff > 1e-2:
        log.warning("%s: image embeddings differ from eval/outputs by up to %.3g (expected f16 rounding only): "
                    "was the checkpoint replaced after evaluation?", info.run_dir.name, diff)
    return {"images": len(common), "max_abs_diff": diff, "file": info.eval_outputs.name}
