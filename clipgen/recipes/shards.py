"""Webdataset shard writing: plain tar files with ``KEY.png|jpg``, ``KEY.txt`` and ``KEY.json`` per sample, the
layout open_clip's trainer reads. Tar headers carry no time or owner, so equal input gives equal bytes.
Sources are image files or shard references ``{tar}#{member}`` (the CC base corpus, clipgen/data/cc.py); an image
already in the target format and size is copied byte for byte, anything else is resized and re-encoded."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

from PIL import Image

from clipgen.data.cc import close_shard_readers, parse_shard_ref, read_shard_member, tar_members
from clipgen.data.index import Sample
from clipgen.errors import ClipgenError

_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


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


def encode_image(path: str, size: int, fmt: str) -> bytes:
    """Image bytes at ``size`` x ``size`` (shorter side resized with bicubic, then centre crop). A source that
    already is an RGB PNG (fmt png) or JPEG (fmt jpg) of that size is copied byte for byte."""
    data = read_source_bytes(path)
    if fmt == "png" and _is_rgb8_png(data, size):
        return data
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size == (size, size) and im.mode == "RGB" and im.format == _PIL_FORMAT[fmt]:
                return data
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
    except OSError as e:
        raise ClipgenError(f"image {path!r} cannot be read ({e}): expected a valid image file") from None


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
    if fmt not in ("png", "jpg"):
        raise ClipgenError(f"invalid recipe.image_format {fmt!r}: expected png or jpg")
    n = len(samples)
    k = shard_count(n, shard_size, min_shards)
    try:
        return _write(out_dir, samples, captions, image_px, fmt, n, k)
    finally:
        close_shard_readers()


def _write(out_dir: Path, samples: list[Sample], captions: list[str], image_px: int, fmt: str, n: int,
           k: int) -> dict[str, int]:
    sizes: dict[str, int] = {}
    bounds = [round(i * n / k) for i in range(k + 1)]
    for si in range(k):
        name = f"shard-{si:05d}.tar"
        with open(out_dir / name, "wb") as tar:
            for i in range(bounds[si], bounds[si + 1]):
                s, key = samples[i], f"{i:08d}"
                _add(tar, f"{key}.{fmt}", encode_image(s.path, image_px, fmt))
                _add(tar, f"{key}.txt", captions[i].encode("utf-8"))
                meta = {"sample_id": s.sample_id, "domain": s.domain, "class_name": s.class_name,
                        "label": s.label, "source": s.source, "split": s.split}
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            tar.write(bytes(2 * _BLOCK))  # end of archive, then padding to a whole record, as tarfile does
            if tar.tell() % _RECORD:
                tar.write(bytes(_RECORD - tar.tell() % _RECORD))
        sizes[name] = bounds[si + 1] - bounds[si]
    return sizes


def count_shard_samples(path: Path) -> int:
    """Number of samples (distinct keys with a .json) actually in a shard, read back from the tar headers."""
    try:
        return sum(1 for name, _, _ in tar_members(Path(path)) if name.endswith(".json"))
    except (tarfile.TarError, OSError) as e:
        raise ClipgenError(f"shard {str(path)!r} cannot be read back ({e}): expected the tar just written") from None
