"""Webdataset shard writing: plain tar files with ``KEY.png|jpg``, ``KEY.txt`` and ``KEY.json`` per sample, the
layout open_clip's trainer reads. Tar headers carry no time or owner, so equal input gives equal bytes."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

from PIL import Image

from clipgen.data.index import Sample
from clipgen.errors import ClipgenError


def encode_image(path: str, size: int, fmt: str) -> bytes:
    """Image bytes at ``size`` x ``size`` (shorter side resized with bicubic, then centre crop). A source that
    already is a PNG of that size is copied byte for byte."""
    try:
        with Image.open(path) as im:
            if fmt == "png" and im.format == "PNG" and im.size == (size, size) and im.mode == "RGB":
                return Path(path).read_bytes()
            im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (size, size):
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            buf = io.BytesIO()
            if fmt == "png":
                im.save(buf, format="PNG", compress_level=6)
            else:
                im.save(buf, format="JPEG", quality=95)
            return buf.getvalue()
    except FileNotFoundError:
        raise ClipgenError(f"image {path!r} listed in the source index does not exist") from None
    except OSError as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e}): expected a valid image file") from None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_count(n: int, shard_size: int, min_shards: int) -> int:
    if n < min_shards:
        raise ClipgenError(f"{n} samples cannot fill recipe.min_shards={min_shards} shards: expected at least "
                           "one sample per shard (lower min_shards or enlarge the recipe)")
    return max(min_shards, math.ceil(n / max(1, shard_size)))


def write_shards(out_dir: Path, samples: list[Sample], captions: list[str], image_px: int, fmt: str,
                 shard_size: int, min_shards: int) -> dict[str, int]:
    """Write ``samples`` (already in their final order) into evenly filled shards; returns {name: count}."""
    if fmt not in ("png", "jpg"):
        raise ClipgenError(f"invalid recipe.image_format {fmt!r}: expected png or jpg")
    n = len(samples)
    k = shard_count(n, shard_size, min_shards)
    sizes: dict[str, int] = {}
    bounds = [round(i * n / k) for i in range(k + 1)]
    for si in range(k):
        name = f"shard-{si:05d}.tar"
        with tarfile.open(out_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(bounds[si], bounds[si + 1]):
                s, key = samples[i], f"{i:08d}"
                _add(tar, f"{key}.{fmt}", encode_image(s.path, image_px, fmt))
                _add(tar, f"{key}.txt", captions[i].encode("utf-8"))
                meta = {"sample_id": s.sample_id, "domain": s.domain, "class_name": s.class_name,
                        "label": s.label, "source": s.source, "split": s.split}
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        sizes[name] = bounds[si + 1] - bounds[si]
    return sizes


def count_shard_samples(path: Path) -> int:
    """Number of samples (distinct keys with a .json) actually in a shard, read back from the tar."""
    with tarfile.open(path, "r") as tar:
        return sum(1 for m in tar.getmembers() if m.name.endswith(".json"))
