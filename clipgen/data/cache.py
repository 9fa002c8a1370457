"""On-disk cache of source indexes, so that recipe builds, training and evaluation do not re-read and re-check a
whole dataset (600k DomainNet split-file lines and folder listings, a CC12M shard scan) every time they start.

    {root}/cache/index-{name}-{key}.json.gz   the index as columns (one JSON list per Sample field), gzip

The key is a hash of the reader's parameters and of every input file's path, size and modification time (split
files, the captions JSON, CC tars): editing, replacing or touching an input gives another key, and the index is
read again. Only a reader's full success is cached, so its errors (a malformed split file ...) are raised every
time. A cache file that cannot be read is reported and rebuilt. The cache holds no pixels and only reflects the
inputs it names: an image file deleted from a DomainNet folder after the first read is noticed when a recipe
build reads that image, not here. ``data.index_cache=false`` turns the cache off.

The reader's existence check of every listed image is part of the cached read, so it runs once per set of split
files, not once per recipe. Within one process (a Hydra multirun of ``clipgen-recipe``, a study planning its
recipes) the decoded index is also kept in memory under the same key, with values derived from it (its hash,
its grouping for the planner; ``derived``), so each job after the first only stats the input files.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterable

from clipgen.data.index import Sample
from clipgen.files import atomic_write_bytes
from clipgen.hashing import stable_hash

log = logging.getLogger("clipgen.data")
INDEX_CACHE_VERSION = 1
_FIELDS = tuple(f.name for f in fields(Sample))
_MEMO_ENTRIES = 4  # indexes kept in memory per process (DomainNet + a base corpus, each ~0.3 GB at full size)
# cache file path (it carries the key of parameters and inputs) -> (samples, values derived from them, the cache
# file's size and mtime when decoded)
_MEMO: "OrderedDict[str, tuple[list[Sample], dict, tuple | None]]" = OrderedDict()


def _file_stat(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _remember(path: Path, samples: list[Sample]) -> list[Sample]:
    _MEMO[str(path)] = (samples, {}, _file_stat(path))
    _MEMO.move_to_end(str(path))
    while len(_MEMO) > _MEMO_ENTRIES:
        _MEMO.popitem(last=False)
    return samples


def _remembered(path: Path) -> list[Sample] | None:
    """The index this process decoded from ``path``, while the file is the one it decoded (a cache file replaced
    or damaged since is read again, and its damage reported)."""
    entry = _MEMO.get(str(path))
    if entry is None:
        return None
    if entry[2] is None or _file_stat(path) != entry[2]:
        del _MEMO[str(path)]
        return None
    _MEMO.move_to_end(str(path))
    return entry[0]


def derived(samples: list[Sample], name: str, compute: Callable[[list[Sample]], object]):
    """``compute(samples)``, computed once per process for an index this module returned from its memory (the
    same list object), else every time."""
    for held, values, _ in _MEMO.values():
        if held is samples:
            if name not in values:
                values[name] = compute(samples)
            return values[name]
    return compute(samples)


def _stats(inputs: Iterable[Path]) -> list | None:
    out = []
    for p in inputs:
        try:
            st = os.stat(p)
        except OSError:
            return None  # a missing input: let the reader report it
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _encode(samples: list[Sample]) -> bytes:
    columns = {f: [getattr(s, f) for s in samples] for f in _FIELDS}
    return gzip.compress(json.dumps({"version": INDEX_CACHE_VERSION, "columns": columns}).encode("utf-8"),
                         compresslevel=1)


def _decode(raw: bytes) -> list[Sample]:
    payload = json.loads(gzip.decompress(raw).decode("utf-8"))
    if payload.get("version") != INDEX_CACHE_VERSION or set(payload["columns"]) != set(_FIELDS):
        raise ValueError("another cache format")
    cols = [payload["columns"][f] for f in _FIELDS]
    return [Sample(*row) for row in zip(*cols)]


def _cache_path(cache_dir: Path | None, name: str, params: dict, inputs: Iterable[Path]) -> Path | None:
    """Where the index of these parameters and inputs is cached (None: no cache, or an input is missing)."""
    if cache_dir is None:
        return None
    stats = _stats(inputs)
    if stats is None:
        return None
    key = stable_hash({"name": name, "params": params, "inputs": stats, "version": INDEX_CACHE_VERSION}, 16)
    return Path(cache_dir) / f"index-{name}-{key}.json.gz"


def cached_index(cache_dir: Path | None, name: str, params: dict, inputs: Iterable[Path],
                 read: Callable[[], list[Sample]]) -> list[Sample]:
    """``read()``'s samples, from ``cache_dir`` when the same parameters and inputs were read before."""
    path = _cache_path(cache_dir, name, params, inputs)
    if path is None:
        return read()
    memo = _remembered(path)
    if memo is not None:
        return memo
    if path.is_file():
        try:
            return _remember(path, _decode(path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            log.warning("index cache %s cannot be read (%s): reading the source again", path, e)
    samples = read()
    try:
        atomic_write_bytes(path, _encode(samples))
    except OSError as e:  # a read-only root still works, just without the cache
        log.warning("index cache %s cannot be written (%s): continuing without it", path, e)
        return samples
    return _remember(path, samples)


def cached_digest(cache_dir: Path | None, name: str, params: dict, inputs: Iterable[Path],
                  read: Callable[[], list[Sample]], digest: Callable[[list[Sample]], str]) -> dict:
    """``{"digest": digest(samples), "num_samples": n}`` of the index :func:`cached_index` gives, kept beside the
    cached index (``index-{name}-{key}.digest.json``), so that asking again costs a ``stat`` per input file and
    not a read of the index: a base corpus's identity (clipgen.recipes.build) at every recipe build and launch."""
    path = _cache_path(cache_dir, name, params, inputs)
    side = None if path is None else path.with_name(path.name[:-len(".json.gz")] + ".digest.json")
    if side is not None and side.is_file():
        try:
            out = json.loads(side.read_text())
            if set(out) == {"digest", "num_samples"}:
                return out
        except (OSError, ValueError):
            pass  # rewritten below
    samples = cached_index(cache_dir, name, params, inputs, read)
    out = {"digest": derived(samples, digest.__name__, digest), "num_samples": len(samples)}
    if side is not None:
        try:
            atomic_write_bytes(side, json.dumps(out).encode("utf-8"))
        except OSError as e:
            log.warning("index digest %s cannot be written (%s): continuing without it", side, e)
    return out
