"""In-memory training data: a recipe's shards plus the base corpus it references, served as augmented batches.

The worlds and recipes clipgen trains on are small (tens of thousands of 32-224 px images), so every sample is
decoded once into one uint8 tensor and every caption tokenized once; a step then costs an index, a batched crop
and a normalisation. Decoding happens at load time in ``data.workers`` processes, one shard per task
(clipgen.train.decode), assembled in shard order, so the data are identical for any worker count; after that no
worker process exists whose state would have to be checkpointed. A guard refuses recipes whose decoded images
(N x 3 x px x px bytes) would exceed ``data.max_memory_gb``: this loader is meant for worlds and small px.

Epoch semantics: **one epoch is one pass over recipe + base corpus**. With N = recipe ``num_samples`` + base
``num_samples`` (from the manifests, and checked against what the shards hold) kept in a canonical order (recipe
then base, each sorted by sample id, so how the builder laid out its shards does not matter), each epoch draws one
permutation of all N indices from a generator seeded with (trainer.seed, epoch), so recipe and base samples are
mixed at the sample level in exact proportion. Batches are consecutive slices of that permutation and the last
partial batch is dropped: ``steps_per_epoch = N // batch_size``, ``samples_per_epoch = steps_per_epoch *
batch_size``; ``trainer.epochs`` counts these passes. Bad samples skipped under ``data.on_bad_sample=skip`` are
simply not among the N (they are listed in ``TrainData.bad_samples`` and the run's meta.json).

Augmentation is the paper's RandomResizedCrop (scale 0.9-1.0, ratio 3/4-4/3, bicubic) with ``affine_grid`` +
``grid_sample``'s sampling, computed on CPU as two separable passes per image (clipgen.train.crop, which states
the float tolerance against the batched grid_sample). Its parameters come from a generator seeded with (seed, epoch,
batch index), and the permutation depends only on (seed, epoch); the loader position (epoch, batch index) is
therefore all a resumed run needs to continue with exactly the next batch, augmented exactly as before.

DDP: ``trainer.batch_size`` is the global batch. Rank r of W takes the r-th of W equal consecutive slices of
every global batch, with the crop parameters drawn for the whole global batch and sliced the same way, so the
ranks' shares are disjoint and together are exactly the single-process batch.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clipgen import recipedir
from clipgen.errors import ClipgenError
from clipgen.train.crop import apply_crop, crop_normalize, normalize
from clipgen.data.sampleindex import META_FIELDS
from clipgen.train.decode import BAD_SAMPLE_POLICIES, IMAGE_EXTS, ShardTask, decode_shards

__all__ = ["IMAGE_EXTS", "META_FIELDS", "TrainData", "Batch", "EpochLoader", "load_train_data",
           "random_resized_crop", "crop_theta", "apply_crop", "normalize", "derive_seed", "leak_allowed",
           "bad_samples_report", "check_data_config"]

CROP_SCALE = (0.9, 1.0)  # paper: RandomResizedCrop(scale=(0.9, 1.0)), torchvision's default ratio
CROP_RATIO = (3 / 4, 4 / 3)
LOADERS = ("auto", "memory", "stream")  # data.loader: see clipgen.train.stream.choose_loader
BAD_SAMPLES_LISTED = 50  # meta.json lists at most this many bad-sample entries (the count is always exact)


@dataclass
class TrainData:
    images: torch.Tensor  # N x 3 x H x W, uint8
    tokens: torch.Tensor  # N x context_length, int64 (open_clip token ids)
    meta: dict[str, list[str]]  # META_FIELDS -> one value per sample, same order as images
    num_recipe: int  # the first num_recipe samples are the recipe's, the rest the base corpus' (each by sample id)
    num_base: int
    bad_samples: list[dict] = field(default_factory=list)  # skipped: {"shard", "key", "reason", "count"}
    labels: torch.Tensor | None = None  # N class targets (supervised objective), set by the trainer

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_skipped(self) -> int:
        return sum(int(b["count"]) for b in self.bad_samples)


def bad_samples_report(data: TrainData, limit: int = BAD_SAMPLES_LISTED) -> dict:
    """What meta.json records under ``bad_samples``: the exact count and the first ``limit`` entries."""
    return {"count": data.num_skipped, "samples": data.bad_samples[:limit],
            "not_listed": max(0, len(data.bad_samples) - limit)}


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple such as ("perm", seed, epoch): independent streams that depend on nothing else."""
    digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def leak_allowed(manifest: dict) -> bool:
    """Pseudo and allow recipes keep (some of) the test domain's held-out classes on purpose."""
    kind = str(manifest.get("kind", ""))
    return kind.endswith("_pseudo") or kind == "allow"


def check_data_config(data_cfg) -> None:
    """Cheap checks of the loader's data.* settings, run before anything is built or decoded."""
    if data_cfg.on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ClipgenError(f"unknown data.on_bad_sample {data_cfg.on_bad_sample!r}: expected one of "
                           f"{', '.join(BAD_SAMPLE_POLICIES)}")
    if data_cfg.loader not in LOADERS:
        raise ClipgenError(f"unknown data.loader {data_cfg.loader!r}: expected one of {', '.join(LOADERS)}")
    if int(data_cfg.workers) < 0:
        raise ClipgenError(f"data.workers={data_cfg.workers}: expected 0 (in-process) or more worker processes")
    if not float(data_cfg.max_memory_gb) > 0:
        raise ClipgenError(f"data.max_memory_gb={data_cfg.max_memory_gb}: expected a positive number of GB")


def _check_memory(recipe_dir: Path, n: int, image_px: int, max_memory_gb: float) -> None:
    need = n * 3 * image_px * image_px
    if need > max_memory_gb * 1e9:
        raise ClipgenError(f"recipe {str(recipe_dir)!r} would take {need / 1e9:.3g} GB decoded ({n} samples x 3 x "
                           f"{image_px} x {image_px} bytes), above data.max_memory_gb={max_memory_gb:g}: the "
                           "in-memory loader is meant for synthetic worlds and small px; use data.loader=stream "
                           "(or auto), "
                           "or raise data.max_memory_gb if this machine has the memory")


def data_sources(recipe_dir: Path, manifest: dict) -> list[tuple[Path, dict[str, int], int]]:
    """(directory, {shard name: count}, num_samples) of the recipe and of the base corpus it references."""
    return recipedir.sources(recipe_dir, manifest)


def shard_tasks(sources) -> tuple[list[ShardTask], list[int]]:
    """One task per shard, in source then shard order, and the index of the source each belongs to."""
    tasks, owner = [], []
    for s, (directory, shards, _) in enumerate(sources):
        for name, count in shards.items():
            shard = directory / name
            if not shard.is_file():
                raise ClipgenError(f"shard {str(shard)!r} listed in the manifest does not exist: rebuild the recipe")
            tasks.append(ShardTask(str(shard), f"{directory.name}/{name}", count))
            owner.append(s)
    return tasks, owner


def leak_guard(manifest: dict) -> dict:
    return {"allow_heldout": leak_allowed(manifest), "test_domain": manifest.get("test_domain"),
            "heldout": set(manifest.get("heldout_classes") or ()), "kind": manifest.get("kind")}


def check_counts(recipe_dir: Path, counts: list[int], skipped: list[int], expected: list[int]) -> None:
    """The good plus the skipped samples of each source (recipe, base) are what its manifest lists."""
    if [c + k for c, k in zip(counts, skipped)] != expected:
        held = " + ".join(f"{c}" + (f" (+{k} skipped)" if k else "") for c, k in zip(counts, skipped))
        raise ClipgenError(f"recipe {str(recipe_dir)!r} holds {held} samples (recipe + base): expected "
                           f"{' + '.join(map(str, expected))} as its manifest says; rebuild the recipe")
    if not sum(counts):
        raise ClipgenError(f"recipe {str(recipe_dir)!r} has no samples: expected a non-empty recipe")


def canonical_order(recipe_dir: Path, sources, results, owner) -> tuple[list[np.ndarray], list[int], list[dict]]:
    """Check the per-source counts against the manifests and place the samples in canonical order (by sample id
    within the recipe, then within the base corpus): training depends on which samples a recipe holds, not on
    how its builder happened to shuffle them into shards. Returns, per result, the destination index of each of
    its samples; the per-source counts; the bad-sample entries."""
    counts, skipped, bad = [], [], []
    for s in range(len(sources)):
        mine = [r for r, o in zip(results, owner) if o == s]
        counts.append(sum(len(r.ids) for r in mine))
        skipped.append(sum(b["count"] for r in mine for b in r.bad))
        bad.extend(b for r in mine for b in r.bad)
    check_counts(recipe_dir, counts, skipped, [n for _, _, n in sources])
    dests: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(results)
    start = 0
    for s in range(len(sources)):
        mine = [i for i, o in enumerate(owner) if o == s]
        ids = [x for i in mine for x in results[i].ids]
        order = sorted(range(len(ids)), key=ids.__getitem__)  # stable: equal ids keep shard order
        dest = np.empty(len(ids), dtype=np.int64)
        dest[order] = np.arange(start, start + len(ids))  # where each sample (in shard order) goes
        offset = 0
        for i in mine:
            n = len(results[i].ids)
            dests[i] = dest[offset:offset + n]
            offset += n
        start += len(ids)
    return dests, counts, bad


def open_recipe(recipe_dir: str | Path, manifest: dict | None, on_bad_sample: str):
    """What both loaders start from: the recipe directory, its manifest (read unless given) and its sources."""
    recipe_dir = Path(recipe_dir)
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ClipgenError(f"unknown data.on_bad_sample {on_bad_sample!r}: expected one of "
                           f"{', '.join(BAD_SAMPLE_POLICIES)}")
    if manifest is None:
        manifest = recipedir.read_manifest(recipe_dir)
    return recipe_dir, manifest, data_sources(recipe_dir, manifest)


def load_train_data(recipe_dir: str | Path, tokenizer, image_px: int, manifest: dict | None = None, *,
                    workers: int = 0, on_bad_sample: str = "error", max_memory_gb: float = 16.0) -> TrainData:
    """Decode every sample of the recipe and of its base corpus into memory (recipe first, then base), with
    ``workers`` processes (0 or 1: in this process). ``on_bad_sample``: "error" | "skip" (see decode.py)."""
    recipe_dir, manifest, sources = open_recipe(recipe_dir, manifest, on_bad_sample)
    _check_memory(recipe_dir, sum(n for _, _, n in sources), int(image_px), float(max_memory_gb))
    tasks, owner = shard_tasks(sources)
    results = decode_shards(tasks, tokenizer, int(image_px), leak_guard(manifest), on_bad_sample, int(workers))
    dests, counts, bad = canonical_order(recipe_dir, sources, results, owner)

    total = sum(counts)
    first = next(r for r in results if r.images is not None)
    images = torch.empty((total, *first.images.shape[1:]), dtype=torch.uint8)
    tokens = torch.empty((total, first.tokens.shape[1]), dtype=torch.int64)
    meta = {f: [""] * total for f in META_FIELDS}
    for r, dest in zip(results, dests):
        if len(r.ids):
            where = torch.from_numpy(dest)
            images[where] = torch.from_numpy(r.images)
            tokens[where] = torch.from_numpy(r.tokens)
            for f in META_FIELDS:
                for j, v in zip(dest.tolist(), r.meta[f]):
                    meta[f][j] = v
            r.images = r.tokens = None  # free as we go: peak memory stays near 2 x the decoded size
    return TrainData(images=images, tokens=tokens, meta=meta, num_recipe=counts[0],
                     num_base=counts[1] if len(counts) > 1 else 0, bad_samples=bad)


def crop_theta(b: int, generator: torch.Generator, scale: tuple[float, float] = CROP_SCALE,
               ratio: tuple[float, float] = CROP_RATIO, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes for ``b`` square images as ``affine_grid`` matrices (b x 2 x 3, float32).

    Like torchvision, each sample tries ``attempts`` (area, aspect) draws and takes the first that fits, falling
    back to the whole image. Crop boxes are continuous (sub-pixel) rather than rounded to whole pixels. The same
    number of random numbers is drawn whatever happens, so the stream depends only on the generator's seed."""
    area = torch.rand(b, attempts, generator=generator) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(b, attempts, generator=generator) * (hi - lo) + lo)
    offsets = torch.rand(b, 2, generator=generator)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # fractions of the side
    fits = (w <= 1.0) & (h <= 1.0)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.ones(b))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.ones(b))
    x0, y0 = offsets[:, 0] * (1 - w), offsets[:, 1] * (1 - h)
    # affine_grid maps output coords in [-1, 1] to input coords: x_in = w * x_out + centre.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    return theta


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator,
                        scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                        attempts: int = 10, mode: str = "bicubic") -> torch.Tensor:
    """torchvision's RandomResizedCrop for a float batch of square images in [0, 1], one crop per sample."""
    return apply_crop(images, crop_theta(images.shape[0], generator, scale, ratio, attempts), size, mode)


@dataclass
class Batch:
    epoch: int
    index: int  # batch index within the epoch
    images: torch.Tensor  # B/W x 3 x px x px, float32, augmented and normalised, on the loader's device
    tokens: torch.Tensor  # B/W x context_length, int64, on the loader's device
    indices: torch.Tensor | None = None  # B/W sample indices into the TrainData (this rank's share)
    labels: torch.Tensor | None = None  # B/W class targets when the data have labels (supervised)


class EpochLoader:
    """Serves ``TrainData`` as seeded, resumable epochs of augmented batches (see the module docstring).
    ``batch_size`` is the global batch; rank ``rank`` of ``world_size`` gets its disjoint share of each."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, image_px: int,
                 device: torch.device | str = "cpu", augment: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ClipgenError(f"trainer.batch_size={batch_size}: expected a positive integer")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ClipgenError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
        if batch_size % world_size:
            raise ClipgenError(f"trainer.batch_size={batch_size} is the global batch and does not split over "
                               f"{world_size} ranks: expected a multiple of {world_size}")
        if len(data) < batch_size:
            raise ClipgenError(f"trainer.batch_size={batch_size} exceeds the {len(data)} samples of recipe + base: "
                               f"expected at most {len(data)} (an epoch would have no full batch)")
        self.data, self.batch_size, self.seed = data, batch_size, int(seed)
        self.image_px, self.device, self.augment = image_px, torch.device(device), augment
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = batch_size // world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        """Samples per epoch over all ranks."""
        return self.steps_per_epoch * self.batch_size

    def _share(self) -> slice:
        return slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("perm", self.seed, int(epoch)))
        return torch.randperm(len(self.data), generator=g)

    def global_batch_indices(self, epoch: int, index: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        perm = self.permutation(epoch) if perm is None else perm
        return perm[index * self.batch_size:(index + 1) * self.batch_size]

    def batch_indices(self, epoch: int, index: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of global batch ``index`` of ``epoch``."""
        return self.global_batch_indices(epoch, index, perm)[self._share()]

    def augment_and_normalize(self, images: torch.Tensor, epoch: int, index: int,
                              out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of global batch ``index`` of ``epoch`` as uint8 -> crop, resize, normalise (float32;
        clipgen.train.crop; ``out``: where to put the result, if the crop can)."""
        if self.augment:  # boxes drawn for the whole global batch, then this rank's share taken
            g = torch.Generator().manual_seed(derive_seed("aug", self.seed, int(epoch), int(index)))
            return crop_normalize(images, crop_theta(self.batch_size, g)[self._share()], self.image_px, out)
        return normalize(images.float().div_(255.0))

    def make_batch(self, epoch: int, index: int, idx: torch.Tensor) -> Batch:
        images = self.data.images[idx].to(self.device, non_blocking=True)
        tokens = self.data.tokens[idx].to(self.device, non_blocking=True)
        return Batch(epoch=epoch, index=index, images=self.augment_and_normalize(images, epoch, index),
                     tokens=tokens, indices=idx, labels=self.labels_of(idx))

    def labels_of(self, idx: torch.Tensor) -> torch.Tensor | None:
        labels = getattr(self.data, "labels", None)
        return None if labels is None else labels[idx].to(self.device, non_blocking=True)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch`` (a resumed run passes the saved batch index)."""
        perm = self.permutation(epoch)
        for index in range(start, self.steps_per_epoch):
            yield self.make_batch(epoch, index, self.batch_indices(epoch, index, perm))
