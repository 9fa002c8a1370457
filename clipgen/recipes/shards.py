"""Webdataset shard writing: plain tar files with ``KEY.png|jpg``, ``KEY.txt`` and ``KEY.json`` per sample, the
layout open_clip's trainer reads. Tar headers carry no time or owner, so equal input gives equal bytes.
Sources are image files or shard references ``{tar}#{member}`` (the CC base corpus, clipgen/data/cc.py); an image
already in the target format and size is copied byte for byte (once it decodes), anything else is resized and
re-encoded. The writer also returns each shard's sample index columns (clipgen.data.sampleindex): where every
image's bytes are, their CRC-32, captions and metadata, so the set's index is written with its shards."""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipgen.data.cc import close_shard_readers, parse_shard_ref, read_shard_member, tar_members
from clipgen.data.imagecodec import decode_rgb
from clipgen.data.index import Sample
from clipgen.data.sampleindex import CATEGORICAL, ShardColumns, imagenet_wnid_index, shard_columns
from clipgen.errors import ClipgenError
from clipgen.facts import DEFAULT_JPEG_QUALITY, RECIPE_IMAGE_FORMATS
from clipgen.recipedir import shard_name
from clipgen.procs import process_pool

_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}
SERIAL_BELOW = 4096  # samples: fewer are written in this process (starting a pool costs more than it saves)


def read_source_bytes(path: str) -> bytes:
    """Bytes of an index location: a file path, or a shard reference ``{tar}#{member}`` (CC base corpus)."""
    if parse_shard_ref(path) is not None:
        return read_shard_member(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ClipgenError(f"image {path!r} listed in the source index does not exist") from None
    except OSError as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e.strerror}): expected a readable image file") from None


def _is_rgb8_png(data: bytes, size: int) -> bool:
    """An 8-bit RGB PNG of size x size, read from its IHDR chunk (what PIL would open as mode RGB, in µs)."""
    return (data[:16] == b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" and len(data) > 26
            and int.from_bytes(data[16:20], "big") == size and int.from_bytes(data[20:24], "big") == size
            and data[24:26] == b"\x08\x02")


def encode_image(path: str, size: int, fmt: str, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Image bytes at ``size`` x ``size`` (shorter side resized with bicubic, then centre crop). A source that
    already is an RGB PNG (fmt png) or JPEG (fmt jpg) of that size is copied byte for byte once it decodes as the
    training loaders decode it (so every image a shard holds can be trained on)."""
    data = read_source_bytes(path)
    if fmt == "png" and _is_rgb8_png(data, size):
        return _decodable(path, data, size)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size == (size, size) and im.mode == "RGB" and im.format == _PIL_FORMAT[fmt]:
                return _decodable(path, data, size)
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
                im.save(buf, format="JPEG", quality=int(quality))
            return buf.getvalue()
    except OSError as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e}): expected a valid image file") from None


def _decodable(path: str, data: bytes, size: int) -> bytes:
    try:
        shape = decode_rgb(data).shape
    except Exception as e:  # PIL and simplejpeg raise many kinds for damaged bytes
        raise ClipgenError(f"image {path!r} cannot be read ({type(e).__name__}: {e}): expected a valid image "
                           "file") from None
    if shape[1:] != (size, size):
        raise ClipgenError(f"image {path!r} decodes to {shape[2]}x{shape[1]} px: expected {size}x{size}")
    return data


_BLOCK, _RECORD = 512, 20 * 512  # tar block; tarfile pads an archive to whole records


def ustar_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a regular file with mode 0644, owner 0/0 and mtime 0 (byte for byte,
    built directly: tarfile's generic header code dominated shard writing)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ClipgenError(f"tar member name {name!r} is longer than 100 bytes: expected a short sample key")
    buf = bytearray(_BLOCK)
    buf[0:len(raw)] = raw
    buf[100:148] = b"0000644\x000000000\x000000000\x00" + b"%011o\x00" % size + b"00000000000\x00"
    buf[148:157] = b"        0"  # checksum placeholder (8 spaces), type "0" = regular file
    buf[257:265] = b"ustar\x0000"  # uname, gname, devmajor/minor (regular file) and prefix stay empty
    buf[148:156] = b"%06o\x00 " % sum(buf)
    return bytes(buf)


def _add(f, name: str, data: bytes) -> None:
    f.write(ustar_header(name, len(data)))
    f.write(data)
    if len(data) % _BLOCK:
        f.write(bytes(_BLOCK - len(data) % _BLOCK))


def shard_count(n: int, shard_size: int, min_shards: int) -> int:
    if n < min_shards:
        raise ClipgenError(f"{n} samples cannot fill recipe.min_shards={min_shards} shards: expected at least "
                           "one sample per shard (lower min_shards or enlarge the recipe)")
    return max(min_shards, math.ceil(n / max(1, shard_size)))


def write_shards(out_dir: Path, samples: list[Sample], captions: list[str], image_px: int, fmt: str,
                 shard_size: int, min_shards: int) -> dict[str, int]:
    """Write ``samples`` (already in their final order) into evenly filled shards; returns {name: count}."""
    return write_shard_set(out_dir, samples, captions, image_px, fmt, shard_size, min_shards)[0]


def write_shard_set(out_dir: Path, samples: list[Sample], captions: list[str], image_px: int, fmt: str,
                    shard_size: int, min_shards: int, *, workers: int = 1,
                    quality: int = DEFAULT_JPEG_QUALITY) -> tuple[dict[str, int], list[ShardColumns]]:
    """Write ``samples`` (in their final order) into evenly filled shards, ``workers`` processes writing whole
    shards (a shard's bytes depend only on its samples, so any worker count writes the same files). Returns
    ({name: count}, each shard's index columns, clipgen.data.sampleindex), the counts read back from the tars."""
    if fmt not in RECIPE_IMAGE_FORMATS:
        raise ClipgenError(f"invalid recipe.image_format {fmt!r}: expected {', '.join(RECIPE_IMAGE_FORMATS)} or auto")
    if fmt == "jpg" and not 1 <= int(quality) <= 100:
        raise ClipgenError(f"recipe.jpeg_quality={quality}: expected 1..100")
    n = len(samples)
    k = shard_count(n, shard_size, min_shards)
    bounds = [round(i * n / k) for i in range(k + 1)]
    jobs = [_ShardJob(Path(out_dir) / shard_name(si), image_px, fmt, int(quality),
                      [(samples[i].path, captions[i], _meta(samples[i])) for i in range(bounds[si], bounds[si + 1])],
                      bounds[si])
            for si in range(k)]
    try:
        if workers <= 1 or k == 1 or n < SERIAL_BELOW:
            columns = [_write_shard(job) for job in jobs]
        else:
            with process_pool(min(workers, k)) as pool:
                columns = list(pool.map(_write_shard, jobs))
    finally:
        close_shard_readers()
    return {c.name: len(c) for c in columns}, columns


def _meta(s: Sample) -> dict:
    return {"sample_id": s.sample_id, "domain": s.domain, "class_name": s.class_name, "label": s.label,
            "source": s.source, "split": s.split}


@dataclass
class _ShardJob:
    path: Path
    image_px: int
    fmt: str
    quality: int
    items: list[tuple[str, str, dict]]  # (image location, caption, .json fields) per sample
    first: int  # running index of the first sample: keys are %08d of it


def _write_shard(job: _ShardJob) -> ShardColumns:
    """One shard file and its index columns; the sample count is read back from the tar's headers."""
    rows = []
    with open(job.path, "wb") as tar:
        for j, (src, caption, meta) in enumerate(job.items):
            key = f"{job.first + j:08d}"
            image = encode_image(src, job.image_px, job.fmt, job.quality)
            rows.append((meta["sample_id"], caption.strip(), {f: str(meta[f]) for f in CATEGORICAL},
                         tar.tell() + _BLOCK, image))
            _add(tar, f"{key}.{job.fmt}", image)
            _add(tar, f"{key}.txt", caption.encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        tar.write(bytes(2 * _BLOCK))  # end of archive, then padding to a whole record, as tarfile does
        if tar.tell() % _RECORD:
            tar.write(bytes(_RECORD - tar.tell() % _RECORD))
    written = count_shard_samples(job.path)
    if written != len(job.items):
        raise ClipgenError(f"shard {str(job.path)!r}: wrote {len(job.items)} samples but {written} read back")
    return shard_columns(job.path.name, len(job.items), os.stat(job.path), rows, [], imagenet_wnid_index())


def count_shard_samples(path: Path) -> int:
    """Number of samples (distinct keys with a .json) actually in a shard, read back from the tar headers."""
    try:
        return sum(1 for name, _, _ in tar_members(Path(path)) if name.endswith(".json"))
    except (tarfile.TarError, OSError) as e:
        raise ClipgenError(f"shard {str(path)!r} cannot be read back ({e}): expected the tar just written") from None
