"""The sample index of a shard set: what the streaming loader needs of every sample, on disk, memory-mapped.

A shard set is a directory of webdataset tars listed in its ``manifest.json`` (a recipe, or the base corpus it
references). Its index is written once, when the shards are written (clipgen.recipes.shards) or, for shards
without one (built by an older clipgen, copied from elsewhere), on their first read by the training loader
(clipgen.train.decode checks every sample then). Every later launch, rank and DataLoader worker memory-maps the
same arrays instead of reading the shards again, so starting costs a ``stat`` per shard and a small JSON read,
whatever the number of samples::

    {set}/index-{key}/index.json     header: version, key, image size, per-shard stats, bad samples, value tables
    {set}/index-{key}/{column}.npy   one value per sample, in canonical order (by sample id)
    {set}/index-{key}/ids.bin        sample ids, UTF-8, in shard order (id_off / id_len locate each)
    {set}/index-{key}/captions.bin   captions, UTF-8, in shard order (caption_off / caption_len locate each)

Columns: ``shard`` (position in the header's shard list), ``offset`` and ``nbytes`` (where the image member's
bytes are in the tar), ``crc`` (their CRC-32, checked at every read), ``id_off`` / ``id_len``, ``caption_off`` /
``caption_len``, ``imagenet`` (ImageNet class index of a ``base/{wnid}/...`` sample, else -1) and one code column
per categorical field (``domain``, ``class_name``, ``label``, ``split``, ``source``: the position of the sample's
value, as the shard's ``.json`` spells it, in the header's ``tables``). Bad samples (a checked shard's samples
that cannot be delivered) are not among the rows; the header lists them (``bad``) for the loader's
``data.on_bad_sample`` policy.

The key hashes the index version, the image size and each shard's name, byte size, modification time and the
sample count the manifest lists for it: a shard that is rewritten, truncated or replaced gives another key, so
the old index is never used for it (the shard is checked again). A change that keeps a shard's size and mtime is
caught when a sample is read (its CRC-32 differs): the loader then stops with an error and invalidates the index.
Everything is written into a temporary sibling and renamed into place, so a reader sees a whole index or none.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from clipgen.errors import ClipgenError
from clipgen.hashing import stable_hash

INDEX_VERSION = 1
INDEX_PREFIX = "index-"
HEADER = "index.json"
CATEGORICAL = ("domain", "class_name", "label", "split", "source")  # the .json fields kept as codes
META_FIELDS = ("sample_id", *CATEGORICAL)  # what the loaders keep of a sample's .json
NUMERIC = ("shard", "offset", "nbytes", "crc", "id_off", "id_len", "caption_off", "caption_len", "imagenet")
_LOCK = ".index.lock"


@dataclass
class ShardColumns:
    """What one shard contributes to its set's index, in the shard's own sample order (built where the shard is
    written or checked, so that only compact arrays cross process boundaries)."""
    name: str  # the shard's file name in the set directory
    expected: int  # samples the manifest lists for it
    size: int  # the shard file's byte size and modification time when it was written or read
    mtime_ns: int
    ids: bytes  # UTF-8 sample ids, back to back; id_len says where each ends
    id_len: np.ndarray
    captions: bytes
    caption_len: np.ndarray
    offsets: np.ndarray  # int64: the image member's data offset in the tar
    nbytes: np.ndarray  # its byte count
    crc: np.ndarray  # uint32: zlib.crc32 of those bytes
    imagenet: np.ndarray  # int16: ImageNet class index from a base/{wnid}/... id, else -1
    cats: dict[str, tuple[list[str], np.ndarray]]  # field -> (distinct values, code of each sample)
    bad: list[dict] = field(default_factory=list)  # {"shard", "key", "reason", "count"} of a checked shard

    def __len__(self) -> int:
        return len(self.offsets)


def shard_columns(name: str, expected: int, stat: os.stat_result, samples: list[tuple], bad: list[dict],
                  imagenet_index) -> ShardColumns:
    """ShardColumns from ``samples`` = [(sample id, caption, {field: value} for CATEGORICAL, image offset, image
    bytes (or their length and CRC-32 as a pair))] in shard order. ``imagenet_index``: wnid -> ImageNet index."""
    ids = [s[0].encode("utf-8") for s in samples]
    caps = [s[1].encode("utf-8") for s in samples]
    cats: dict[str, tuple[list[str], np.ndarray]] = {}
    for f in CATEGORICAL:
        table: dict[str, int] = {}
        codes = np.fromiter((table.setdefault(s[2][f], len(table)) for s in samples), dtype=np.int32,
                            count=len(samples))
        cats[f] = (list(table), codes)
    sizes = [s[4] if isinstance(s[4], tuple) else (len(s[4]), zlib.crc32(s[4])) for s in samples]
    return ShardColumns(
        name=name, expected=int(expected), size=int(stat.st_size), mtime_ns=int(stat.st_mtime_ns),
        ids=b"".join(ids), id_len=np.array([len(b) for b in ids], dtype=np.uint32),
        captions=b"".join(caps), caption_len=np.array([len(b) for b in caps], dtype=np.uint32),
        offsets=np.array([s[3] for s in samples], dtype=np.int64),
        nbytes=np.array([n for n, _ in sizes], dtype=np.uint32), crc=np.array([c for _, c in sizes], dtype=np.uint32),
        imagenet=np.array([_imagenet_of(s[0], imagenet_index) for s in samples], dtype=np.int16),
        cats=cats, bad=list(bad))


@functools.lru_cache(maxsize=None)
def imagenet_wnid_index() -> dict[str, int]:
    """ImageNet wnid -> class index (the supervised baseline's targets for base-corpus samples)."""
    from clipgen.facts import imagenet_class_index

    return {wnid: i for i, (wnid, _) in imagenet_class_index().items()}


def _imagenet_of(sample_id: str, imagenet_index) -> int:
    parts = sample_id.split("/")
    return imagenet_index.get(parts[1], -1) if len(parts) > 2 and parts[0] == "base" else -1


# --- where an index lives, and its key -------------------------------------------------------------------------
def shard_stats(set_dir: Path, shards: dict[str, int]) -> list[list]:
    """[name, size, mtime_ns, expected count] of every shard the manifest lists, in name order (write order)."""
    out = []
    for name in sorted(shards):
        path = Path(set_dir) / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ClipgenError(f"shard {str(path)!r} listed in the manifest does not exist: rebuild the "
                               "recipe") from None
        out.append([name, int(st.st_size), int(st.st_mtime_ns), int(shards[name])])
    return out


def index_key(stats: list[list], image_px: int) -> str:
    return stable_hash({"version": INDEX_VERSION, "image_px": int(image_px), "shards": stats}, 16)


def index_dir(set_dir: Path, key: str, fallback: Path | None = None) -> Path:
    """The directory an index with ``key`` has: inside the set, or under ``fallback`` when the set directory is
    read-only (shared recipes on a read-only file system)."""
    home = Path(set_dir)
    if fallback is not None and not os.access(home, os.W_OK):
        home = Path(fallback) / stable_hash(str(Path(set_dir).resolve()), 12)
    return home / f"{INDEX_PREFIX}{key}"


@contextlib.contextmanager
def build_lock(where: Path):
    """One index builder per set at a time (DDP ranks and a study's trainers start together); the others wait
    and then find its index. The kernel releases the lock however its holder ends."""
    where.mkdir(parents=True, exist_ok=True)
    with open(where / _LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: builders may race; each renames a whole index or none
            pass
        yield


# --- writing ------------------------------------------------------------------------------------------------------
def _smallest_uint(n: int):
    return np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.uint32


def write_index(final: Path, columns: list[ShardColumns], image_px: int, key: str, built_by: str) -> Path:
    """Merge the shards' columns (in shard order) into one index in canonical order and publish it at ``final``
    (a temporary sibling renamed into place; if another process published the same key first, its copy stays)."""
    final = Path(final)
    if (final / HEADER).is_file():
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        header = _write_columns(tmp, columns)
        header.update(version=INDEX_VERSION, key=key, image_px=int(image_px), built_by=built_by)
        (tmp / HEADER).write_text(json.dumps(header, sort_keys=True))
        if final.is_dir() and not (final / HEADER).is_file():  # an index dropped after a failed read
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / HEADER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in final.parent.glob(f"{INDEX_PREFIX}*"):  # indexes of earlier shard contents are stale
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_columns(out: Path, columns: list[ShardColumns]) -> dict:
    n = sum(len(c) for c in columns)
    ids = np.concatenate([_split_blob(c.ids, c.id_len) for c in columns]) if n else np.empty(0, dtype="S1")
    order = np.argsort(ids, kind="stable")  # canonical order: by sample id; UTF-8 bytes sort as code points
    tables: dict[str, list[str]] = {}
    codes: dict[str, np.ndarray] = {}
    for f in CATEGORICAL:
        table: dict[str, int] = {}
        parts = []
        for c in columns:
            values, local = c.cats[f]
            remap = np.array([table.setdefault(v, len(table)) for v in values], dtype=np.int64)
            parts.append(remap[local] if len(local) else np.empty(0, dtype=np.int64))
        tables[f] = list(table)
        codes[f] = np.concatenate(parts).astype(_smallest_uint(len(table))) if parts else np.empty(0, np.uint8)
    arrays = {
        "shard": np.concatenate([np.full(len(c), i, dtype=np.int64) for i, c in enumerate(columns)] or [[]]),
        "offset": np.concatenate([c.offsets for c in columns] or [[]]).astype(np.int64),
        "nbytes": np.concatenate([c.nbytes for c in columns] or [[]]).astype(np.uint32),
        "crc": np.concatenate([c.crc for c in columns] or [[]]).astype(np.uint32),
        "imagenet": np.concatenate([c.imagenet for c in columns] or [[]]).astype(np.int16),
        **_write_blob(out / "ids.bin", [(c.ids, c.id_len) for c in columns], "id"),
        **_write_blob(out / "captions.bin", [(c.captions, c.caption_len) for c in columns], "caption"),
        **codes,
    }
    arrays["shard"] = arrays["shard"].astype(_smallest_uint(len(columns)))
    for name, values in arrays.items():
        np.save(out / f"{name}.npy", np.ascontiguousarray(values[order]))
    return {"num_samples": int(n), "tables": tables,
            "shards": [{"name": c.name, "size": c.size, "mtime_ns": c.mtime_ns, "expected": c.expected,
                        "samples": len(c)} for c in columns],
            "bad": [b for c in columns for b in c.bad]}


def _split_blob(blob: bytes, lens: np.ndarray) -> np.ndarray:
    ends = np.cumsum(lens, dtype=np.int64)
    starts = ends - lens
    return np.array([blob[a:b] for a, b in zip(starts.tolist(), ends.tolist())], dtype=bytes) if len(lens) else \
        np.empty(0, dtype="S1")


def _write_blob(path: Path, parts: Iterable[tuple[bytes, np.ndarray]], name: str) -> dict[str, np.ndarray]:
    """Blobs back to back in one file; returns each item's offset and length (shard order)."""
    offs, lens, pos = [], [], 0
    with open(path, "wb") as f:
        for blob, lengths in parts:
            f.write(blob)
            ends = np.cumsum(lengths, dtype=np.int64)
            offs.append(pos + ends - lengths)
            lens.append(np.asarray(lengths, dtype=np.uint32))
            pos += len(blob)
    return {f"{name}_off": np.concatenate(offs or [np.empty(0, np.int64)]),
            f"{name}_len": np.concatenate(lens or [np.empty(0, np.uint32)])}


# --- reading ------------------------------------------------------------------------------------------------------
class SampleIndex:
    """One shard set's index, its columns memory-mapped on first use. Pickles as two paths (a DataLoader worker
    maps the same files: nothing of the data travels)."""

    def __init__(self, set_dir: str | os.PathLike, path: str | os.PathLike):
        self.set_dir, self.path = Path(set_dir), Path(path)
        try:
            self.header = json.loads((self.path / HEADER).read_text())
        except (OSError, ValueError) as e:
            raise ClipgenError(f"sample index {str(self.path)!r} cannot be read ({e}): delete it and restart "
                               "(it is rebuilt from the shards)") from None
        self.shard_paths = [str(self.set_dir / sh["name"]) for sh in self.header["shards"]]
        self._cols: dict[str, np.ndarray] = {}
        self._blobs: dict[str, np.memmap] = {}

    def __getstate__(self):
        return {"set_dir": str(self.set_dir), "path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["set_dir"], state["path"])

    def __len__(self) -> int:
        return int(self.header["num_samples"])

    @property
    def bad(self) -> list[dict]:
        return list(self.header["bad"])

    @property
    def tables(self) -> dict[str, list[str]]:
        return self.header["tables"]

    def column(self, name: str) -> np.ndarray:
        if name not in self._cols:
            self._cols[name] = np.load(self.path / f"{name}.npy", mmap_mode="r") if len(self) else np.empty(0)
        return self._cols[name]

    def _blob(self, name: str) -> np.memmap | bytes:
        if name not in self._blobs:
            path = self.path / f"{name}.bin"
            self._blobs[name] = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""
        return self._blobs[name]

    def _texts(self, blob: str, prefix: str, rows: Iterable[int]) -> list[str]:
        data, off, ln = self._blob(blob), self.column(f"{prefix}_off"), self.column(f"{prefix}_len")
        return [bytes(data[int(off[r]):int(off[r]) + int(ln[r])]).decode("utf-8") for r in rows]

    def sample_ids(self, rows: Iterable[int]) -> list[str]:
        return self._texts("ids", "id", rows)

    def captions(self, rows: Iterable[int]) -> list[str]:
        return self._texts("captions", "caption", rows)

    def values(self, name: str, rows=None) -> list[str]:
        """A categorical field's values (as the shards' .json spell them) for ``rows`` (all when None)."""
        codes = self.column(name) if rows is None else self.column(name)[rows]
        table = self.tables[name]
        return [table[c] for c in np.asarray(codes).tolist()]

    def codes_of(self, name: str, values: Iterable[str]) -> list[int]:
        table = self.tables[name]
        return [table.index(v) for v in values if v in table]

    def rows_with(self, name: str, values: Iterable[str]) -> np.ndarray:
        """Rows whose ``name`` is one of ``values`` (no scan when no sample has any of them)."""
        codes = self.codes_of(name, values)
        if not codes:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(np.isin(self.column(name), codes))

    def invalidate(self) -> None:
        """Forget this index (a read found its shard's bytes changed): the next launch checks the shards again."""
        with contextlib.suppress(OSError):
            os.unlink(self.path / HEADER)


def open_index(set_dir: Path, shards: dict[str, int], image_px: int, fallback: Path | None = None
               ) -> tuple[SampleIndex | None, str, list[list]]:
    """(the set's current index or None, its key, the shards' stats): a ``stat`` per shard and one JSON read."""
    stats = shard_stats(set_dir, shards)
    key = index_key(stats, image_px)
    path = index_dir(set_dir, key, fallback)
    if not (path / HEADER).is_file():
        return None, key, stats
    return SampleIndex(set_dir, path), key, stats
