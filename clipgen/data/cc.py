"""Reader for img2dataset-style webdataset shards (CC3M / CC12M) as the natural base corpus (``data.base=cc``).

    {dir}/00000.tar   000000000.jpg  000000000.txt  000000000.json  000000001.jpg ...   (plain, uncompressed tar)

``data.cc_shards`` names the tars: a brace pattern (``/data/cc3m/{00000..00331}.tar``), a glob
(``/data/cc3m/*.tar``) or several of either joined by ``::`` (webdataset's convention). Every key with an image
(``jpg``/``jpeg``/``png``/``webp``) and a non-empty ``txt`` caption becomes one Sample: id ``cc/{tar stem}/{key}``,
domain "natural", class_name "" and label -1 (unknown), split train, source "cc", caption = the txt with
whitespace normalised (the ``json`` is not needed). Its location is a *shard reference* ``{tar}#{member}``: the
absolute tar path, ``#``, and the image member's name inside the tar (``/data/cc3m/00000.tar#000000000.jpg``).
``read_shard_member`` returns a referenced member's bytes by seeking to it; a tar's member offsets are indexed
while the shards are read, or on first access, and dropped by ``close_shard_readers``. Shards are only read.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

from braceexpand import braceexpand

from clipgen.data import ustar
from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import BASE_DOMAIN

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_REF = re.compile(r"^(?P<tar>.+\.tar)#(?P<member>[^#]+)$")
_WS = re.compile(r"\s+")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the first dot of the basename
_MAX_OPEN = 32  # open tar handles kept for random access

# tar path -> {member name: (data offset, size)}; open file handles, least recently used first.
_OFFSETS: dict[str, dict[str, tuple[int, int]]] = {}
_HANDLES: "OrderedDict[str, object]" = OrderedDict()


def shard_ref(tar: str | os.PathLike, member: str) -> str:
    return f"{tar}#{member}"


def parse_shard_ref(path: str) -> tuple[str, str] | None:
    """(tar path, member name) if ``path`` is a shard reference, else None (a plain file path)."""
    m = _REF.match(path)
    return (m.group("tar"), m.group("member")) if m else None


def expand_shards(pattern: str, key: str = "data.cc_shards") -> list[Path]:
    """Tar paths named by brace patterns and globs joined by '::', in order, each once; all must exist."""
    if not pattern or not str(pattern).strip():
        raise ClipgenError(f"{key} is not set: expected a brace pattern or glob of img2dataset .tar shards, "
                           "e.g. /data/cc3m/{00000..00331}.tar")
    out: list[Path] = []
    for part in str(pattern).split("::"):
        for item in braceexpand(os.path.expanduser(part.strip())):
            if any(ch in item for ch in "*?["):
                hits = sorted(glob.glob(item))
                if not hits:
                    raise ClipgenError(f"{key}={pattern!r}: {item!r} matches no file: expected .tar shards")
            else:
                hits = [item]
            for h in hits:
                p = Path(h).resolve()
                if not p.is_file():
                    raise ClipgenError(f"{key}={pattern!r}: shard {str(p)!r} does not exist: expected every "
                                       "expanded path to be an img2dataset .tar shard")
                if not p.name.endswith(".tar"):
                    raise ClipgenError(f"{key}={pattern!r}: {str(p)!r} is not a plain .tar shard: expected "
                                       "uncompressed webdataset tars (img2dataset's default output)")
                if p not in out:
                    out.append(p)
    return out


def _members_fast(tar: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of every regular member from the ustar headers alone, seeking past the data
    (several times faster than tarfile); None where a header needs tarfile (see clipgen.data.ustar)."""
    with open(tar, "rb") as f:
        def read_block(pos: int) -> bytes:
            f.seek(pos)
            return f.read(ustar.BLOCK)

        try:
            scanned = ustar.scan(read_block, os.fstat(f.fileno()).st_size)
        except ustar.TruncatedMember as e:
            raise ClipgenError(f"shard {str(tar)!r} is truncated inside member {e.name!r}: "
                               "expected a complete tar") from None
    return None if scanned is None else scanned[0]


def tar_members(tar: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member of a plain tar, in order."""
    fast = _members_fast(tar)
    if fast is not None:
        return fast
    with tarfile.open(tar, "r:") as tf:
        return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]


def _scan_tar(tar: Path) -> tuple[dict[str, dict[str, str]], dict[str, tuple[int, int]], dict[str, str]]:
    """One pass over a tar: per key {ext: member name} (first-seen order), member offsets of images, captions."""
    keys: dict[str, dict[str, str]] = {}
    offsets: dict[str, tuple[int, int]] = {}
    texts: dict[str, str] = {}
    try:
        members = tar_members(tar)
        with open(tar, "rb") as f:
            for name, offset, size in members:
                km = _KEY.match(name)
                if not km:
                    continue
                key, ext = km.group(1), km.group(2).lower()
                keys.setdefault(key, {})[ext] = name
                if ext in IMAGE_EXTS:
                    offsets[name] = (offset, size)
                elif ext == "txt":
                    f.seek(offset)
                    texts[key] = f.read(size).decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, ValueError) as e:
        raise ClipgenError(f"shard {str(tar)!r} cannot be read as a tar ({e}): expected an img2dataset "
                           "webdataset shard") from None
    return keys, offsets, texts


def read_cc_shards(pattern: str, source: str = "cc", key: str = "data.cc_shards") -> list[Sample]:
    """All usable image-caption pairs of the shards, in shard order and, within a shard, in tar order."""
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    skipped = 0
    for tar in expand_shards(pattern, key):
        keys, offsets, texts = _scan_tar(tar)
        _OFFSETS[str(tar)] = offsets
        for k, members in keys.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            caption = _WS.sub(" ", texts.get(k, "")).strip()
            if image is None or not caption:
                skipped += 1  # img2dataset writes failed downloads without an image; a pair needs both
                continue
            sid = f"cc/{tar.stem}/{k}"
            if sid in seen:
                raise ClipgenError(f"{key}: sample {sid!r} occurs in {str(seen[sid])!r} and {str(tar)!r}: "
                                   "expected shard names (stems) and keys to be unique")
            seen[sid] = tar
            samples.append(Sample(sample_id=sid, path=shard_ref(tar, image), domain=BASE_DOMAIN, class_name="",
                                  label=-1, split="train", source=source, caption=caption))
    if skipped:
        log.warning("%s: skipped %d keys without an image or a non-empty caption", key, skipped)
    if not samples:
        raise ClipgenError(f"{key}={pattern!r} holds no image-caption pairs: expected {{key}}.jpg + "
                           "{key}.txt members (img2dataset's webdataset output)")
    return samples


def _handle(tar: str):
    f = _HANDLES.pop(tar, None)
    if f is None:
        f = open(tar, "rb")
        while len(_HANDLES) >= _MAX_OPEN:
            _HANDLES.popitem(last=False)[1].close()
    _HANDLES[tar] = f
    return f


def read_shard_member(ref: str) -> bytes:
    """Bytes of the member a shard reference ``{tar}#{member}`` points to."""
    parsed = parse_shard_ref(ref)
    if parsed is None:
        raise ClipgenError(f"{ref!r} is not a shard reference: expected '{{tar path}}#{{member name}}'")
    tar, member = parsed
    try:
        if tar not in _OFFSETS:
            _OFFSETS[tar] = {name: (offset, size) for name, offset, size in tar_members(Path(tar))}
        if member not in _OFFSETS[tar]:
            raise ClipgenError(f"shard reference {ref!r}: no member {member!r} in {tar!r}: expected the "
                               "shard the index was read from")
        offset, size = _OFFSETS[tar][member]
        f = _handle(tar)
        f.seek(offset)
        data = f.read(size)
    except FileNotFoundError:
        raise ClipgenError(f"shard {tar!r} of reference {ref!r} does not exist") from None
    except (tarfile.TarError, OSError, ValueError) as e:
        raise ClipgenError(f"shard {tar!r} cannot be read ({e}): expected a plain webdataset tar") from None
    if len(data) != size:
        raise ClipgenError(f"shard {tar!r} is truncated at member {member!r}: expected {size} bytes, got "
                           f"{len(data)}")
    return data


def close_shard_readers() -> None:
    """Close the open tar handles and drop the offset indexes (the shard writer calls this when it is done)."""
    while _HANDLES:
        _HANDLES.popitem(last=False)[1].close()
    _OFFSETS.clear()
