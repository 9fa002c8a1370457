"""In-memory training data: a recipe's shards plus the base corpus it references, served as augmented batches.

The worlds and recipes clipgen trains on are small (tens of thousands of 32-224 px images), so every sample is
decoded once into one uint8 tensor and every caption tokenized once; a step then costs an index, a batched crop
and a normalisation, with no worker processes whose state would have to be checkpointed.

Epoch semantics: **one epoch is one pass over recipe + base corpus**. With N = recipe ``num_samples`` + base
``num_samples`` (from the manifests, and checked against what the shards hold) kept in a canonical order (recipe
then base, each sorted by sample id, so how the builder laid out its shards does not matter), each epoch draws one
permutation of all N indices from a generator seeded with (trainer.seed, epoch), so recipe and base samples are
mixed at the sample level in exact proportion. Batches are consecutive slices of that permutation and the last
partial batch is dropped: ``steps_per_epoch = N // batch_size``, ``samples_per_epoch = steps_per_epoch *
batch_size``; ``trainer.epochs`` counts these passes.

Augmentation is the paper's RandomResizedCrop (scale 0.9-1.0, ratio 3/4-4/3, bicubic), done for the whole batch
at once with ``affine_grid`` + ``grid_sample``. Its parameters come from a generator seeded with (seed, epoch,
batch index), and the permutation depends only on (seed, epoch); the loader position (epoch, batch index) is
therefore all a resumed run needs to continue with exactly the next batch, augmented exactly as before.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from clipgen.errors import ClipgenError
from clipgen.utils import read_json

META_FIELDS = ("sample_id", "domain", "class_name", "split", "source")
IMAGE_EXTS = ("png", "jpg", "jpeg")
CROP_SCALE = (0.9, 1.0)  # paper: RandomResizedCrop(scale=(0.9, 1.0)), torchvision's default ratio
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class TrainData:
    images: torch.Tensor  # N x 3 x H x W, uint8
    tokens: torch.Tensor  # N x context_length, int64 (open_clip token ids)
    meta: dict[str, list[str]]  # META_FIELDS -> one value per sample, same order as images
    num_recipe: int  # the first num_recipe samples are the recipe's, the rest the base corpus' (each by sample id)
    num_base: int

    def __len__(self) -> int:
        return self.images.shape[0]


def derive_seed(*parts) -> int:
    """A 63-bit seed from a tuple such as ("perm", seed, epoch): independent streams that depend on nothing else."""
    digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def leak_allowed(manifest: dict) -> bool:
    """Pseudo and allow recipes keep (some of) the test domain's held-out classes on purpose."""
    kind = str(manifest.get("kind", ""))
    return kind.endswith("_pseudo") or kind == "allow"


def _read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one webdataset tar in file order: (key, {extension: bytes}); key = name up to its first dot."""
    try:
        tf = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise ClipgenError(f"shard {str(path)!r} cannot be read ({e}): expected a webdataset tar") from None
    with tf:
        key, parts = None, {}
        for member in tf:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            k, ext = name.split(".", 1)
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext.lower()] = tf.extractfile(member).read()
        if key is not None:
            yield key, parts


def _decode(key: str, parts: dict[str, bytes], shard: Path, image_px: int) -> tuple[np.ndarray, str, dict]:
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None or "txt" not in parts or "json" not in parts:
        raise ClipgenError(f"sample {key!r} in shard {str(shard)!r} has parts {sorted(parts)}: expected an image "
                           f"({'/'.join(IMAGE_EXTS)}), .txt and .json")
    with Image.open(io.BytesIO(parts[ext])) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[0] != image_px or arr.shape[1] != image_px:
        raise ClipgenError(f"sample {key!r} in shard {str(shard)!r} is {arr.shape[1]}x{arr.shape[0]} px: expected "
                           f"{image_px}x{image_px} (model.image_px); rebuild the recipe with "
                           f"recipe.image_px={image_px}")
    meta = json.loads(parts["json"].decode("utf-8"))
    return arr, parts["txt"].decode("utf-8").strip(), meta


def _check_sample(meta: dict, key: str, shard: Path, manifest: dict) -> None:
    """The load-time leak guard: nothing from a test split, and no held-out class of the test domain unless the
    recipe is a pseudo/allow recipe that keeps them by design."""
    sid = meta.get("sample_id", key)
    if meta.get("split") == "test":
        raise ClipgenError(f"leak: sample {sid!r} in shard {str(shard)!r} has split 'test': expected only train "
                           "samples in training shards")
    if (not leak_allowed(manifest) and meta.get("domain") == manifest.get("test_domain")
            and meta.get("class_name") in set(manifest.get("heldout_classes") or ())):
        raise ClipgenError(f"leak: sample {sid!r} in shard {str(shard)!r} is held-out class "
                           f"{meta.get('class_name')!r} of test domain {meta.get('domain')!r}: expected none in a "
                           f"{manifest.get('kind')!r} recipe")


def _shard_names(manifest: dict, where: Path) -> list[str]:
    shards = manifest.get("shards")
    if not isinstance(shards, dict):
        raise ClipgenError(f"manifest of {str(where)!r} has shards={shards!r}: expected {{name: count}}")
    return sorted(shards)  # shard-NNNNN.tar: name order is write order


def load_train_data(recipe_dir: str | Path, tokenizer, image_px: int, manifest: dict | None = None) -> TrainData:
    """Decode every sample of the recipe and of its base corpus into memory (recipe first, then base)."""
    recipe_dir = Path(recipe_dir)
    if manifest is None:
        manifest = read_json(recipe_dir / "manifest.json", "recipe manifest")
    sources = [(recipe_dir, _shard_names(manifest, recipe_dir), int(manifest["num_samples"]))]
    base = manifest.get("base")
    if base:
        base_dir = (recipe_dir / base["dir"]).resolve()
        sources.append((base_dir, _shard_names(base, base_dir), int(base["num_samples"])))

    arrays, captions, meta = [], [], {f: [] for f in META_FIELDS}
    counts = []
    for directory, names, _ in sources:
        records = []
        for name in names:
            shard = directory / name
            if not shard.is_file():
                raise ClipgenError(f"shard {str(shard)!r} listed in the manifest does not exist: rebuild the recipe")
            for key, parts in _read_shard(shard):
                arr, caption, m = _decode(key, parts, shard, image_px)
                _check_sample(m, key, shard, manifest)
                records.append((str(m.get("sample_id", key)), arr, caption, m))
        # Canonical order (by sample id): training depends on which samples a recipe holds, not on how its
        # builder happened to shuffle them into shards.
        records.sort(key=lambda r: r[0])
        for _, arr, caption, m in records:
            arrays.append(arr)
            captions.append(caption)
            for f in META_FIELDS:
                meta[f].append(str(m.get(f, "")))
        counts.append(len(records))
    expected = [n for _, _, n in sources]
    if counts != expected:
        raise ClipgenError(f"recipe {str(recipe_dir)!r} holds {' + '.join(map(str, counts))} samples (recipe + base): "
                           f"expected {' + '.join(map(str, expected))} as its manifest says; rebuild the recipe")
    if not arrays:
        raise ClipgenError(f"recipe {str(recipe_dir)!r} has no samples: expected a non-empty recipe")

    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # N x 3 x H x W uint8
    tokens = tokenizer(captions).long()  # tokenized once; a step only indexes
    return TrainData(images=images, tokens=tokens, meta=meta, num_recipe=counts[0],
                     num_base=counts[1] if len(counts) > 1 else 0)


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator,
                        scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                        attempts: int = 10, mode: str = "bicubic") -> torch.Tensor:
    """torchvision's RandomResizedCrop for a float batch of square images in [0, 1], one crop per sample.

    Like torchvision, each sample tries ``attempts`` (area, aspect) draws and takes the first that fits, falling
    back to the whole image. Crop boxes are continuous (sub-pixel) rather than rounded to whole pixels. The same
    number of random numbers is drawn whatever happens, so the stream depends only on the generator's seed."""
    b = images.shape[0]
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
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


def normalize(images: torch.Tensor) -> torch.Tensor:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass
class Batch:
    epoch: int
    index: int  # batch index within the epoch
    images: torch.Tensor  # B x 3 x px x px, float32, augmented and normalised, on the loader's device
    tokens: torch.Tensor  # B x context_length, int64, on the loader's device


class EpochLoader:
    """Serves ``TrainData`` as seeded, resumable epochs of augmented batches (see the module docstring)."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, image_px: int,
                 device: torch.device | str = "cpu", augment: bool = True):
        if batch_size <= 0:
            raise ClipgenError(f"trainer.batch_size={batch_size}: expected a positive integer")
        if len(data) < batch_size:
            raise ClipgenError(f"trainer.batch_size={batch_size} exceeds the {len(data)} samples of recipe + base: "
                               f"expected at most {len(data)} (an epoch would have no full batch)")
        self.data, self.batch_size, self.seed = data, batch_size, int(seed)
        self.image_px, self.device, self.augment = image_px, torch.device(device), augment

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("perm", self.seed, int(epoch)))
        return torch.randperm(len(self.data), generator=g)

    def batch_indices(self, epoch: int, index: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        perm = self.permutation(epoch) if perm is None else perm
        return perm[index * self.batch_size:(index + 1) * self.batch_size]

    def make_batch(self, epoch: int, index: int, idx: torch.Tensor) -> Batch:
        images = self.data.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
        if self.augment:
            g = torch.Generator().manual_seed(derive_seed("aug", self.seed, int(epoch), int(index)))
            images = random_resized_crop(images, self.image_px, g)
        tokens = self.data.tokens[idx].to(self.device, non_blocking=True)
        return Batch(epoch=epoch, index=index, images=normalize(images), tokens=tokens)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch`` (a resumed run passes the saved batch index)."""
        perm = self.permutation(epoch)
        for index in range(start, self.steps_per_epoch):
            yield self.make_batch(epoch, index, self.batch_indices(epoch, index, perm))
