"""Decoding training shards: one webdataset tar per task, in worker processes, results in shard order.

A task reads one shard, decodes its images to uint8 CHW arrays, tokenizes its captions and checks every sample
(the leak guard, the image size). What comes back depends only on the shard's bytes, and the caller assembles
the results in shard order, so the decoded data are identical for any number of workers.

Bad samples are samples a shard cannot deliver: image bytes PIL cannot decode, a missing or unreadable
``.txt``/``.json``, and everything from the point where a tar is truncated or corrupt (a tar that ends early
at a member boundary shows up as fewer samples than the manifest lists for that shard). With
``on_bad_sample="error"`` (the default) the first one raises a ClipgenError naming the shard file and the
sample key; with ``"skip"`` each is left out and reported as ``{"shard", "key", "reason", "count"}`` (count > 1
for the samples lost behind a truncation). Wrong image sizes and leak-guard violations are never skippable:
they mean a wrong recipe, not a damaged file.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipgen.data import ustar
from clipgen.data.imagecodec import decode_rgb
from clipgen.data.sampleindex import CATEGORICAL, META_FIELDS, ShardColumns, imagenet_wnid_index, shard_columns
from clipgen.errors import ClipgenError
from clipgen.train.leakguard import check_sample
from clipgen.procs import process_pool

IMAGE_EXTS = ("png", "jpg", "jpeg")
BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass
class ShardTask:
    path: str  # the shard file
    label: str  # "{directory name}/{shard name}", how run metadata names the shard
    expected: int  # samples the manifest lists for this shard


@dataclass
class ShardResult:
    ids: list[str]  # sample ids (the json's sample_id, else the key), in shard order
    images: np.ndarray | None  # n x 3 x px x px uint8 (None when n == 0)
    tokens: np.ndarray | None  # n x context_length int64
    meta: dict[str, list[str]]  # META_FIELDS -> one value per sample
    bad: list[dict] = field(default_factory=list)  # skipped: {"shard", "key", "reason", "count"}


class _BadSample(Exception):
    """Internal: this sample cannot be decoded; the message says why."""


_STATE: dict = {}  # per process: tokenizer, image_px, guard, policy (set by _init)


def _init(tokenizer, image_px: int, guard: dict, policy: str) -> None:
    if "torch" in sys.modules:  # a worker process: one intra-op thread, like a torch DataLoader worker
        sys.modules["torch"].set_num_threads(1)
    _STATE.update(tokenizer=tokenizer, image_px=int(image_px), guard=guard, policy=policy)


def _ustar_members(buf: bytes) -> list[tuple[str, bytes, int]] | None:
    """(name, bytes, data offset) of every regular file of a plain, intact ustar tar. None at anything else (see
    clipgen.data.ustar, a truncated member, no end-of-archive block): the caller then reads the shard with
    tarfile, whose errors name what is wrong."""
    try:
        scanned = ustar.scan(lambda pos: buf[pos:pos + ustar.BLOCK], len(buf))
    except ustar.TruncatedMember:
        return None
    if scanned is None or not scanned[1]:
        return None
    return [(name, buf[offset:offset + size], offset) for name, offset, size in scanned[0]]


Samples = list[tuple[str, dict[str, bytes], dict[str, int]]]


def _group(members) -> tuple[Samples, tuple[str | None, str] | None]:
    """Consecutive members with the same key form a sample; ``members`` yields (name, read function, data offset).
    Each sample is (key, {extension: bytes}, {extension: offset of its bytes in the tar})."""
    samples, key, parts, where = [], None, {}, {}
    try:
        for path, data, offset in members:
            name = path.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            k, ext = name.split(".", 1)
            if k != key:
                if key is not None:
                    samples.append((key, parts, where))
                key, parts, where = k, {}, {}
            parts[ext.lower()] = data()
            where[ext.lower()] = int(offset)
    except (OSError, EOFError, tarfile.TarError) as e:
        return samples, (key, f"tar truncated or corrupt ({' '.join(str(e).split())})")  # one line
    if key is not None:
        samples.append((key, parts, where))
    return samples, None


def _tarfile_members(path: str):
    with tarfile.open(path, "r") as tf:
        for member in tf:
            if member.isfile():
                yield member.name, tf.extractfile(member).read, member.offset_data


def read_shard(path: str) -> tuple[Samples, tuple[str | None, str] | None]:
    """All samples of a tar in file order as (key, {extension: bytes}, {extension: offset}); key = file name up to
    its first dot. The second value is None, or (key of the sample being read, reason) when the tar is truncated
    or corrupt: that sample and everything after it are lost. Intact plain tars take a fast path; tarfile reads
    the rest."""
    try:
        with open(path, "rb") as f:
            members = _ustar_members(f.read())
    except OSError as e:
        return [], (None, f"shard cannot be read ({e})")
    if members is None:
        return _group(_tarfile_members(path))
    return _group((name, lambda data=data: data, offset) for name, data, offset in members)


def _decode(key: str, parts: dict[str, bytes]) -> tuple[np.ndarray, str, dict]:
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None or "txt" not in parts or "json" not in parts:
        raise _BadSample(f"has parts {sorted(parts)}: expected an image ({'/'.join(IMAGE_EXTS)}), .txt and .json")
    try:
        arr = decode_rgb(parts[ext])
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, zlib/struct errors ... for bad bytes
        why = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")  # no object addresses: same every run
        raise _BadSample(f"image .{ext} cannot be decoded ({why}): expected a valid image") from None
    try:
        meta = json.loads(parts["json"].decode("utf-8"))
        caption = parts["txt"].decode("utf-8").strip()
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadSample(f".json/.txt cannot be read ({e}): expected UTF-8 text and a JSON object") from None
    if not isinstance(meta, dict):
        raise _BadSample(f".json holds {type(meta).__name__}: expected a JSON object")
    return arr, caption, meta


def _bad(task: ShardTask, key: str | None, reason: str, count: int = 1) -> dict:
    if _STATE["policy"] != "skip":
        where = f"sample {key!r}" if key is not None else "before its first sample"
        raise ClipgenError(f"bad sample in shard {task.path!r}: {where}: {reason} (data.on_bad_sample=skip "
                           "skips such samples and counts them in the run's meta.json)")
    return {"shard": task.label, "key": key, "reason": reason, "count": int(count)}


def _check_shard(task: ShardTask, keep_images: bool):
    """Read, decode and check every sample of one shard: (good samples, bad-sample entries). A good sample is
    (sample id, image array (3 x px x px) or None, caption, meta, image offset in the tar, image byte count)."""
    px, guard = _STATE["image_px"], _STATE["guard"]
    samples, failure = read_shard(task.path)
    good, bad = [], []
    for key, parts, where in samples:
        try:
            arr, caption, m = _decode(key, parts)
        except _BadSample as e:
            bad.append(_bad(task, key, str(e)))
            continue
        if arr.shape[1] != px or arr.shape[2] != px:
            raise ClipgenError(f"sample {key!r} in shard {task.path!r} is {arr.shape[2]}x{arr.shape[1]} px: "
                               f"expected {px}x{px} (model.image_px); rebuild the recipe with recipe.image_px={px}")
        check_sample(m, key, task.path, guard)
        ext = next(e for e in IMAGE_EXTS if e in parts)
        good.append((str(m.get("sample_id", key)), arr if keep_images else None, caption,
                     {f: str(m.get(f, "")) for f in META_FIELDS}, where[ext], len(parts[ext]),
                     None if keep_images else zlib.crc32(parts[ext])))
    lost = task.expected - len(good) - len(bad)
    if failure is not None:
        key, reason = failure
        bad.append(_bad(task, key, f"{reason}: this and the following samples are lost", max(1, lost)))
    elif lost > 0:
        last = samples[-1][0] if samples else None
        bad.append(_bad(task, last, f"is the last of {len(samples)} samples but the manifest lists "
                                    f"{task.expected} for this shard (truncated tar)", lost))
    elif lost < 0:
        raise ClipgenError(f"shard {task.path!r} holds {len(samples)} samples: expected {task.expected} as the "
                           "manifest says; rebuild the recipe")
    return good, bad


def _meta_lists(good) -> dict[str, list[str]]:
    return {f: [g[3][f] for g in good] for f in META_FIELDS}


def decode_shard(task: ShardTask) -> ShardResult:
    good, bad = _check_shard(task, keep_images=True)
    ids, captions = [g[0] for g in good], [g[2] for g in good]
    if not ids:
        return ShardResult(ids, None, None, _meta_lists(good), bad)
    images = np.stack([g[1] for g in good])  # n x 3 x px x px
    unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # template captions repeat: tokenize each once
    tokens = _STATE["tokenizer"](list(unique)).long().numpy()[[unique[c] for c in captions]]  # numpy: pickled by value
    return ShardResult(ids, images, tokens, _meta_lists(good), bad)


def index_shard(task: ShardTask) -> ShardColumns:
    """Like decode_shard (every image is decoded once, so bad samples are found before training), but keeps only
    the shard's sample index columns (clipgen.data.sampleindex): where each good sample's image bytes are, their
    CRC-32, captions and metadata, and the bad samples, listed whatever data.on_bad_sample says (the loader applies
    the policy, so one index serves both)."""
    stat = os.stat(task.path)  # before reading: a shard that changes meanwhile gets another key next time
    good, bad = _check_shard(task, keep_images=False)
    rows = [(g[0], g[2], {f: g[3][f] for f in CATEGORICAL}, g[4], (g[5], g[6])) for g in good]
    return shard_columns(Path(task.path).name, task.expected, stat, rows, bad, imagenet_wnid_index())


def _run_tasks(fn, tasks: list[ShardTask], tokenizer, image_px: int, guard: dict, policy: str, workers: int) -> list:
    if policy not in BAD_SAMPLE_POLICIES:
        raise ClipgenError(f"unknown data.on_bad_sample {policy!r}: expected one of {', '.join(BAD_SAMPLE_POLICIES)}")
    args = (tokenizer, image_px, guard, policy)
    if workers <= 1 or len(tasks) <= 1:
        saved = dict(_STATE)
        _STATE.clear()
        _STATE.update(tokenizer=tokenizer, image_px=int(image_px), guard=guard, policy=policy)
        try:
            return [fn(t) for t in tasks]
        finally:
            _STATE.clear()
            _STATE.update(saved)
    with process_pool(min(workers, len(tasks)), _init, args) as pool:
        # map keeps task order, so with several bad shards the first one in shard order is the one reported
        return list(pool.map(fn, tasks))


def decode_shards(tasks: list[ShardTask], tokenizer, image_px: int, guard: dict, policy: str,
                  workers: int) -> list[ShardResult]:
    """``decode_shard`` over ``tasks`` with ``workers`` processes (0 or 1: in this process), in task order."""
    return _run_tasks(decode_shard, tasks, tokenizer, image_px, guard, policy, workers)


def index_shards(tasks: list[ShardTask], image_px: int, guard: dict, workers: int) -> list[ShardColumns]:
    """``index_shard`` over ``tasks`` with ``workers`` processes, in task order; bad samples are collected (the
    policy is the caller's), wrong image sizes and leak-guard violations raise."""
    return _run_tasks(index_shard, tasks, None, image_px, guard, "skip", workers)
