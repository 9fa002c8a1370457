"""Streaming training data: recipes too large to decode into memory (paper scale: ~575k DomainNet images at 224 px,
plus a base corpus of up to ~10M pairs with CC12M).

The semantics are those of the in-memory loader (clipgen.train.data): the same N samples in the same canonical
order, the same permutation per (seed, epoch), the same crop boxes per (seed, epoch, batch index) and the same
rank shares. On CPU a recipe therefore gives bitwise the same batches through either loader; only where the
pixels come from differs.

What a launch reads is each shard set's sample index (clipgen.data.sampleindex), written with the shards when the
recipe was built: a ``stat`` per shard and a small JSON file, then memory-mapped arrays; no shard is opened and
no sample is decoded before the first batch, and nothing per sample lives in Python objects. Shards without a
current index (built by an older clipgen, copied in, or changed since) are checked once, in ``data.workers``
processes: every image is decoded, the leak guard and the image size are checked, bad samples are found exactly
as the in-memory loader finds them, and the index is written for the next launch, rank and worker.
``data.on_bad_sample`` applies to the bad samples an index lists. Each launch also applies the recipe's held-out
rule to the index's domain and class columns.

During training a torch DataLoader with ``data.workers`` workers assembles whole batches: it reads each image's
bytes with one ``os.pread`` from its tar (in a plain tar a member's bytes are contiguous), checks their CRC-32
against the index, decodes, crops, normalises and tokenizes. The main process draws the permutation and hands
each worker a batch's sample indices; what a worker returns depends only on (seed, epoch, batch index, rank), so
the worker count never changes the data, and the loader position (epoch, batch index) in ``latest.pt`` is all a
resumed run needs. A worker receives the loader as a few paths and numbers (its pickle is a few kB whatever N;
the tokenizer travels as its model's name), maps the index files itself, and is bound to the trainer before it
runs anything (clipgen.procs). Bytes that differ from the indexed ones (a shard changed while training) stop the
run with one line naming the shard and the sample, and drop the index so that the next launch checks again.

Why random access rather than sequential tar streaming with a shuffle buffer: buffer shuffling mixes only
within a buffer and a shard order, so it gives neither exact sample-level proportions between base corpus and
recipe, nor an order that depends on (seed, epoch) alone, nor resume at an exact sample. Each read is one image
member (a few to ~150 kB) at a known offset: cheap on local disks and on cluster file systems.
"""
from __future__ import annotations

import logging
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clipgen.data.imagecodec import decode_rgb
from clipgen.data.sampleindex import (META_FIELDS, SampleIndex, build_lock, index_dir, open_index, write_index)
from clipgen.errors import ClipgenError
from clipgen.procs import bind_to_parent, bound_forkserver
from clipgen.train.data import (LOADERS, Batch, EpochLoader, check_counts, data_sources, derive_seed, leak_guard,
                                load_train_data, open_recipe, shard_tasks)
from clipgen.train.decode import BAD_SAMPLE_POLICIES, index_shards

log = logging.getLogger(__name__)


@dataclass
class StreamData:
    """The recipe's and the base corpus's sample indexes as one sequence of N samples in canonical order (recipe
    first): only paths and counts in memory, the columns memory-mapped."""
    sets: list[SampleIndex]
    image_px: int
    num_recipe: int
    num_base: int
    bad_samples: list[dict] = field(default_factory=list)  # skipped under data.on_bad_sample=skip
    labels: torch.Tensor | None = None  # N class targets (supervised objective), set by the trainer

    def __len__(self) -> int:
        return self.num_recipe + self.num_base

    def __getstate__(self):  # what a worker needs: the index paths (not the labels, not the bad-sample list)
        return {"sets": self.sets, "image_px": self.image_px, "num_recipe": self.num_recipe,
                "num_base": self.num_base}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def num_skipped(self) -> int:
        return sum(int(b["count"]) for b in self.bad_samples)

    def where(self, i: int) -> tuple[SampleIndex, int]:
        """(the index holding sample ``i``, its row there)."""
        return (self.sets[0], i) if i < self.num_recipe else (self.sets[1], i - self.num_recipe)

    def sample_id(self, i: int) -> str:
        ix, row = self.where(int(i))
        return ix.sample_ids([row])[0]

    def value(self, i: int, name: str) -> str:
        """Sample ``i``'s categorical field ``name`` (META_FIELDS but sample_id)."""
        ix, row = self.where(int(i))
        return ix.values(name, [row])[0]

    def captions(self, idx) -> list[str]:
        out = []
        for i in np.asarray(idx).tolist():
            ix, row = self.where(i)
            out.extend(ix.captions([row]))
        return out

    @property
    def meta(self) -> dict[str, list[str]]:
        """META_FIELDS -> one value per sample, as the in-memory loader keeps them (built on each access: N Python
        strings per field, for tests and small recipes; training never asks)."""
        out: dict[str, list[str]] = {f: [] for f in META_FIELDS}
        for ix in self.sets:
            out["sample_id"] += ix.sample_ids(range(len(ix)))
            for f in META_FIELDS[1:]:
                out[f] += ix.values(f)
        return out

    def label_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(DomainNet label or -1, ImageNet index of a base/{wnid}/... id or -1) per sample, from the columns."""
        labels, imagenet = [], []
        for ix in self.sets:
            table = np.array([int(v) if v.lstrip("-").isdigit() else -1 for v in ix.tables["label"]] or [-1])
            labels.append(table[np.asarray(ix.column("label"), dtype=np.int64)])
            imagenet.append(np.asarray(ix.column("imagenet"), dtype=np.int64))
        return np.concatenate(labels), np.concatenate(imagenet)


def _policy(bad: list[dict], set_dirs: dict[str, Path], on_bad_sample: str) -> None:
    """data.on_bad_sample over an index's bad samples: error names the first (shard order) as the check does."""
    if bad and on_bad_sample != "skip":
        b = bad[0]
        d, name = b["shard"].split("/", 1)
        where = f"sample {b['key']!r}" if b["key"] is not None else "before its first sample"
        raise ClipgenError(f"bad sample in shard {str(set_dirs[d] / name)!r}: {where}: {b['reason']} "
                           "(data.on_bad_sample=skip skips such samples and counts them in the run's meta.json)")


def _held_out_rule(ix: SampleIndex, guard: dict) -> None:
    """The leak guard's rules on the index's columns: no test split, and no held-out class of the test domain
    unless the recipe keeps them by design (the sample id / .json agreement was checked when it was indexed)."""
    bad = ix.rows_with("split", ["test"])
    if len(bad):
        row = int(bad[0])
        raise ClipgenError(f"leak: sample {ix.sample_ids([row])[0]!r} in shard {_shard_of(ix, row)!r} has split "
                           "'test': expected only train samples in training shards")
    if guard["allow_heldout"] or not ix.codes_of("domain", [guard["test_domain"]]):
        return
    rows = ix.rows_with("class_name", sorted(guard["heldout"]))
    if len(rows):
        rows = rows[np.isin(ix.column("domain")[rows], ix.codes_of("domain", [guard["test_domain"]]))]
    if len(rows):
        row = int(rows[0])
        raise ClipgenError(f"leak: sample {ix.sample_ids([row])[0]!r} in shard {_shard_of(ix, row)!r} is held-out "
                           f"class {ix.values('class_name', [row])[0]!r} of test domain {guard['test_domain']!r}: "
                           f"expected none in a {guard['kind']!r} recipe")


def _shard_of(ix: SampleIndex, row: int) -> str:
    return ix.shard_paths[int(ix.column("shard")[row])]


def set_index(set_dir: Path, shards: dict[str, int], image_px: int, kind: str, workers: int,
              fallback: Path | None = None) -> SampleIndex:
    """The shard set's current index; shards without one are checked (every sample decoded) and indexed once,
    by one process at a time (DDP ranks and a study's trainers start together: the others then find it)."""
    ix, key, _ = open_index(set_dir, shards, image_px, fallback)
    if ix is not None:
        return ix
    final = index_dir(set_dir, key, fallback)
    with build_lock(final.parent):
        ix, key, _ = open_index(set_dir, shards, image_px, fallback)
        if ix is not None:
            return ix
        log.info("checking the %d shards of %s once (decoding every image) to write their sample index",
                 len(shards), set_dir)
        tasks, _ = shard_tasks([(set_dir, shards, sum(shards.values()))])
        guard = {"allow_heldout": True, "test_domain": None, "heldout": set(), "kind": kind}
        columns = index_shards(tasks, int(image_px), guard, int(workers))
        return SampleIndex(set_dir, write_index(final, columns, image_px, key, "check"))


def load_stream_data(recipe_dir: str | Path, image_px: int, manifest: dict | None = None, *, workers: int = 0,
                     on_bad_sample: str = "error", index_fallback: Path | None = None) -> StreamData:
    """The recipe's and its base corpus's sample indexes (checked and written once where missing), with
    ``on_bad_sample`` applied to the bad samples they list and the recipe's leak guard to their columns."""
    recipe_dir, manifest, sources = open_recipe(recipe_dir, manifest, on_bad_sample)
    sets = [set_index(d, shards, image_px, str(manifest.get("kind")), workers, index_fallback)
            for d, shards, _ in sources]
    bad = [b for ix in sets for b in ix.bad]
    _policy(bad, {d.name: d for d, _, _ in sources}, on_bad_sample)
    counts = [len(ix) for ix in sets]
    check_counts(recipe_dir, counts, [sum(int(b["count"]) for b in ix.bad) for ix in sets],
                 [n for _, _, n in sources])
    guard = leak_guard(manifest)
    for ix in sets:
        _held_out_rule(ix, guard)
    return StreamData(sets=sets, image_px=int(image_px), num_recipe=counts[0],
                      num_base=counts[1] if len(counts) > 1 else 0, bad_samples=bad)


class _Reader:
    """Reads, checks and decodes samples' images; file descriptors are opened lazily, per process (an LRU of
    _MAX_FDS: a 10M-sample base corpus has thousands of shards)."""

    _MAX_FDS = 64

    def __init__(self, data: StreamData):
        self.data = data
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self._buffer: np.ndarray | None = None

    def __getstate__(self):
        return {"data": self.data}

    def __setstate__(self, state):
        self.__init__(state["data"])

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self._fds) >= self._MAX_FDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def images(self, idx: np.ndarray, reuse: bool = False) -> torch.Tensor:
        """uint8 n x 3 x px x px for the samples ``idx`` (canonical indices), decoded as the in-memory loader
        decodes them. ``reuse``: into this reader's buffer, valid until the next such call (a fresh array per
        batch pays its page faults again, which on a VM cost a sizeable share of decoding it)."""
        px = self.data.image_px
        shape = (len(idx), 3, px, px)
        if not reuse:
            out = np.empty(shape, dtype=np.uint8)
        elif self._buffer is not None and self._buffer.shape == shape:
            out = self._buffer
        else:
            out = self._buffer = np.empty(shape, dtype=np.uint8)
        for k, i in enumerate(np.asarray(idx).tolist()):
            ix, row = self.data.where(i)
            path = _shard_of(ix, row)
            offset, n, crc = int(ix.column("offset")[row]), int(ix.column("nbytes")[row]), int(ix.column("crc")[row])
            raw = os.pread(self._fd(path), n, offset)
            try:
                if len(raw) != n:
                    raise ValueError(f"read {len(raw)} of {n} bytes")
                if zlib.crc32(raw) != crc:
                    raise ValueError("its bytes are not the indexed ones (CRC-32 differs)")
                arr = decode_rgb(raw)
                if arr.shape[1:] != (px, px):
                    raise ValueError(f"{arr.shape[2]}x{arr.shape[1]} px, expected {px}x{px}")
            except Exception as e:  # the shard changed after it was indexed
                ix.invalidate()
                raise ClipgenError(f"sample {ix.sample_ids([row])[0]!r} (key {_member_key(self._fd(path), offset)!r}) "
                                   f"in shard {path!r} cannot be read as indexed ({type(e).__name__}: {e}): the shard "
                                   "changed while training; its index is dropped, so restarting the run checks the "
                                   "shards again (rebuild the recipe if they are damaged)") from None
            out[k] = arr
        return torch.from_numpy(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = OrderedDict()


def _member_key(fd: int, data_offset: int) -> str | None:
    """The webdataset key of the tar member whose data start at ``data_offset`` (read from its header)."""
    try:
        head = os.pread(fd, 512, data_offset - 512)
        return head[:100].split(b"\0", 1)[0].decode("utf-8", "replace").rsplit("/", 1)[-1].split(".", 1)[0] or None
    except OSError:
        return None


class _Batches(torch.utils.data.Dataset):
    """Item ``(epoch, b, idx)`` = batch ``b`` of ``epoch`` for one rank (its samples ``idx``, drawn by the main
    process), read, decoded, augmented and normalised in a DataLoader worker."""

    def __init__(self, loader: "StreamLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.steps_per_epoch

    def __getitem__(self, key):
        epoch, index, idx = int(key[0]), int(key[1]), torch.from_numpy(key[2])
        images, tokens = self.loader.assemble(epoch, index, idx, torch.device("cpu"))
        return epoch, index, images, tokens, idx


class _Keys:
    """The DataLoader's sampler: ``(epoch, batch index, this rank's sample indices)`` from ``(epoch, start)`` to
    the end of epoch ``last - 1``; one epoch's permutation at a time lives in the main process only."""

    def __init__(self, loader: "StreamLoader", epoch: int, start: int, last: int):
        self.loader, self.epoch, self.start, self.last = loader, epoch, start, last

    def __len__(self) -> int:
        return (self.last - self.epoch) * self.loader.steps_per_epoch - self.start

    def __iter__(self):
        spe = self.loader.steps_per_epoch
        for e in range(self.epoch, self.last):
            perm = self.loader.permutation(e)
            for i in range(self.start if e == self.epoch else 0, spe):
                yield e, i, self.loader.batch_indices(e, i, perm).numpy().copy()  # 8 bytes a sample, by value


def _worker_init(_):
    bind_to_parent()  # dies with the trainer, even after kill -9 (and, through the fork server, from its start)
    torch.set_num_threads(1)


class StreamLoader(EpochLoader):
    """EpochLoader's batches (same permutation, crops, rank shares), read from the shards as they are needed,
    assembled in ``workers`` DataLoader workers (0: in this process)."""

    def __init__(self, data: StreamData, batch_size: int, seed: int, image_px: int, tokenizer,
                 device: torch.device | str = "cpu", augment: bool = True, rank: int = 0, world_size: int = 1,
                 workers: int = 2, prefetch: int = 2, epochs: int | None = None):
        super().__init__(data, batch_size, seed, image_px, device, augment, rank, world_size)
        self.tokenizer, self.workers, self.prefetch = tokenizer, int(workers), int(prefetch)
        self.epochs = epochs  # the run's epoch count: lets one set of workers serve all remaining epochs
        self.reader = _Reader(data)
        self._live, self._live_next, self._live_last = None, None, 0

    def __getstate__(self):  # what a worker receives: no device tensors, no live iterator, nothing open
        state = dict(self.__dict__)
        state.update(device=torch.device("cpu"), _live=None)
        return state

    def assemble(self, epoch: int, index: int, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        images = self.reader.images(idx.numpy(), reuse=True).to(device)  # read only by the crop below
        out = None
        if self.augment and device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
            # in a DataLoader worker the batch goes to the trainer through shared memory: write it there directly
            out = torch.empty((len(idx), 3, self.image_px, self.image_px)).share_memory_()
        images = self.augment_and_normalize(images, epoch, index, out)
        captions = self.data.captions(idx.numpy())
        unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        tokens = self.tokenizer(list(unique)).long()[[unique[c] for c in captions]]
        return images, tokens.to(device)

    def make_batch(self, epoch: int, index: int, idx: torch.Tensor) -> Batch:
        images, tokens = self.assemble(epoch, index, idx, self.device)
        return Batch(epoch=epoch, index=index, images=images, tokens=tokens, indices=idx, labels=self.labels_of(idx))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch``. With ``epochs`` given, one set of DataLoader workers
        serves every remaining epoch: a call that continues where the previous one ended reuses them (and the
        batches they already prefetched); any other position starts fresh workers there."""
        if self.workers <= 0:
            yield from super().batches(epoch, start)
            return
        if self._live is None or self._live_next != (epoch, start) or epoch >= self._live_last:
            self._live = self._start(epoch, start)
        spe = self.steps_per_epoch
        for index in range(start, spe):
            e, i, images, tokens, idx = next(self._live)
            if (e, i) != (epoch, index):  # the sampler's own order: cannot happen unless this class is broken
                raise RuntimeError(f"stream loader out of step: got batch {i} of epoch {e}, expected batch {index} "
                                   f"of epoch {epoch}")
            self._live_next = (epoch, index + 1) if index + 1 < spe else (epoch + 1, 0)
            if self._live_next == (self._live_last, 0):  # its last batch: let the workers exit now
                next(self._live, None)
                self._live = None
            yield Batch(epoch=epoch, index=index, images=images.to(self.device, non_blocking=True),
                        tokens=tokens.to(self.device, non_blocking=True), indices=idx, labels=self.labels_of(idx))

    def _start(self, epoch: int, start: int):
        import multiprocessing as mp

        last = max(self.epochs or 0, epoch + 1)
        # Like clipgen.procs.process_pool: fork only while no other thread runs (W&B's would make it unsafe).
        method = "fork" if threading.active_count() == 1 else "forkserver"
        bound_forkserver()
        dl = torch.utils.data.DataLoader(
            _Batches(self), batch_size=None, sampler=_Keys(self, epoch, start, last), num_workers=self.workers,
            prefetch_factor=self.prefetch, worker_init_fn=_worker_init, multiprocessing_context=mp.get_context(method),
            pin_memory=self.device.type == "cuda")
        self._live_next, self._live_last = (epoch, start), last
        return iter(dl)


def decoded_gb(num_samples: int, image_px: int) -> float:
    return num_samples * 3 * image_px * image_px / 1e9


def choose_loader(data_cfg, recipe_dir: Path, manifest: dict, image_px: int) -> str:
    """``data.loader``: memory | stream, or auto = memory while the decoded images fit data.max_memory_gb."""
    kind = str(data_cfg.loader)
    if kind not in LOADERS:
        raise ClipgenError(f"unknown data.loader {kind!r}: expected one of {', '.join(LOADERS)}")
    if kind != "auto":
        return kind
    n = sum(n for _, _, n in data_sources(Path(recipe_dir), manifest))
    return "memory" if decoded_gb(n, image_px) <= float(data_cfg.max_memory_gb) else "stream"


def make_loader(cfg, recipe_dir: str | Path, manifest: dict, tokenizer, *, device: torch.device | str = "cpu",
                rank: int = 0, world_size: int = 1) -> tuple[str, object, EpochLoader]:
    """``(kind, data, loader)``: the training loader ``cfg`` asks for over the recipe and its base corpus, the
    in-memory one (TrainData, EpochLoader) or the streaming one (StreamData, StreamLoader), chosen by
    :func:`choose_loader`; the trainer and the loader benchmarks build their loaders here. Reads
    ``data.loader``, ``data.workers``, ``data.on_bad_sample``, ``data.max_memory_gb``, ``model.image_px`` and
    ``trainer.batch_size``, ``trainer.seed``, ``trainer.epochs``."""
    d, tc, px = cfg.data, cfg.trainer, int(cfg.model.image_px)
    workers, policy, batch, seed = int(d.workers), str(d.on_bad_sample), int(tc.batch_size), int(tc.seed)
    kind = choose_loader(d, Path(recipe_dir), manifest, px)
    shard = dict(rank=rank, world_size=world_size)
    if kind == "stream":
        from clipgen import layout
        from clipgen.models.factory import NamedTokenizer

        data = load_stream_data(recipe_dir, px, manifest, workers=workers, on_bad_sample=policy,
                                index_fallback=layout.cache_dir(cfg) / "sample-index")
        return kind, data, StreamLoader(data, batch, seed, px, NamedTokenizer(str(cfg.model.name), tokenizer), device,
                                        workers=workers, epochs=int(tc.epochs), **shard)
    data = load_train_data(recipe_dir, tokenizer, px, manifest, workers=workers, on_bad_sample=policy,
                           max_memory_gb=float(d.max_memory_gb))
    return kind, data, EpochLoader(data, batch, seed, px, device, **shard)


__all__ = ["StreamData", "StreamLoader", "load_stream_data", "set_index", "choose_loader", "make_loader", "LOADERS",
           "BAD_SAMPLE_POLICIES", "derive_seed"]
