"""Streaming training data: recipes too large to decode into memory (paper scale, ~575k images at 224 px).

The semantics are those of the in-memory loader (clipgen.train.data): the same N samples in the same canonical
order, the same permutation per (seed, epoch), the same crop boxes per (seed, epoch, batch index) and the same
rank shares. On CPU a recipe therefore gives bitwise the same batches through either loader; only where the
pixels come from differs.

At start every shard is checked once, in ``data.workers`` processes: each image is decoded once, the leak guard
and the image size are checked, and bad samples are found exactly as the in-memory loader finds them. What is
kept is each sample's image location (shard, byte offset, byte count), caption and metadata, about 200 bytes a
sample. During training a torch DataLoader with ``data.workers`` workers assembles whole batches: it reads each
image's bytes with one ``os.pread`` from its tar (in a plain tar a member's bytes are contiguous), decodes,
crops, normalises and tokenizes. A worker is given only a batch index and what it returns depends only on
(seed, epoch, batch index, rank), so the worker count never changes the data, and the loader position
(epoch, batch index) in ``latest.pt`` is all a resumed run needs.

Why random access rather than sequential tar streaming with a shuffle buffer: buffer shuffling mixes only
within a buffer and a shard order, so it gives neither exact sample-level proportions between base corpus and
recipe, nor an order that depends on (seed, epoch) alone, nor resume at an exact sample. Each read is one image
member (a few to ~150 kB) at a known offset: cheap on local disks and on cluster file systems.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clipgen.errors import ClipgenError
from clipgen.procs import bind_to_parent
from clipgen.train.data import (LOADERS, Batch, EpochLoader, canonical_order, data_sources, derive_seed,
                                leak_guard, load_train_data, open_recipe, shard_tasks)
from clipgen.train.decode import META_FIELDS, decode_rgb, index_shards


@dataclass
class StreamData:
    shards: list[str]  # shard paths; shard_of indexes this list
    shard_of: np.ndarray  # N, int32
    offsets: np.ndarray  # N, int64: byte offset of each sample's image in its shard
    sizes: np.ndarray  # N, int64: the image's byte count
    captions: list[str]
    meta: dict[str, list[str]]  # META_FIELDS -> one value per sample (canonical order)
    image_px: int
    num_recipe: int
    num_base: int
    bad_samples: list[dict] = field(default_factory=list)
    labels: torch.Tensor | None = None  # N class targets (supervised objective), set by the trainer

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_skipped(self) -> int:
        return sum(int(b["count"]) for b in self.bad_samples)


def load_stream_data(recipe_dir: str | Path, image_px: int, manifest: dict | None = None, *, workers: int = 0,
                     on_bad_sample: str = "error") -> StreamData:
    """Check every shard of the recipe and its base corpus once and index where each good sample's image is."""
    recipe_dir, manifest, sources = open_recipe(recipe_dir, manifest, on_bad_sample)
    tasks, owner = shard_tasks(sources)
    results = index_shards(tasks, int(image_px), leak_guard(manifest), on_bad_sample, int(workers))
    dests, counts, bad = canonical_order(recipe_dir, sources, results, owner)
    total = sum(counts)
    shard_of = np.empty(total, dtype=np.int32)
    offsets = np.empty(total, dtype=np.int64)
    sizes = np.empty(total, dtype=np.int64)
    captions = [""] * total
    meta = {f: [""] * total for f in META_FIELDS}
    for t, (r, dest) in enumerate(zip(results, dests)):
        shard_of[dest], offsets[dest], sizes[dest] = t, r.offsets, r.sizes
        for j, c in zip(dest.tolist(), r.captions):
            captions[j] = c
        for f in META_FIELDS:
            for j, v in zip(dest.tolist(), r.meta[f]):
                meta[f][j] = v
    return StreamData(shards=[t.path for t in tasks], shard_of=shard_of, offsets=offsets, sizes=sizes,
                      captions=captions, meta=meta, image_px=int(image_px), num_recipe=counts[0],
                      num_base=counts[1] if len(counts) > 1 else 0, bad_samples=bad)


class _Reader:
    """Reads and decodes samples' images; file descriptors are opened lazily, per process."""

    def __init__(self, data: StreamData):
        self.data = data
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._buffer: np.ndarray | None = None

    def __getstate__(self):
        return {"data": self.data}

    def __setstate__(self, state):
        self.__init__(state["data"])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.data.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def images(self, idx: np.ndarray, reuse: bool = False) -> torch.Tensor:
        """uint8 n x 3 x px x px for the samples ``idx`` (canonical indices), decoded as the in-memory loader
        decodes them. ``reuse``: into this reader's buffer, valid until the next such call (a fresh array per
        batch pays its page faults again, which on a VM cost a sizeable share of decoding it)."""
        d, px = self.data, self.data.image_px
        shape = (len(idx), 3, px, px)
        if not reuse:
            out = np.empty(shape, dtype=np.uint8)
        elif self._buffer is not None and self._buffer.shape == shape:
            out = self._buffer
        else:
            out = self._buffer = np.empty(shape, dtype=np.uint8)
        for k, i in enumerate(idx.tolist()):
            shard = int(d.shard_of[i])
            raw = os.pread(self._fd(shard), int(d.sizes[i]), int(d.offsets[i]))
            try:
                if len(raw) != int(d.sizes[i]):
                    raise ValueError(f"read {len(raw)} of {int(d.sizes[i])} bytes")
                arr = decode_rgb(raw)
                if arr.shape[1:] != (px, px):
                    raise ValueError(f"{arr.shape[2]}x{arr.shape[1]} px, expected {px}x{px}")
            except Exception as e:  # the shard changed after it was checked at start
                raise ClipgenError(f"sample {d.meta['sample_id'][i]!r} in shard {d.shards[shard]!r} cannot be "
                                   f"decoded any more ({type(e).__name__}: {e}): the shard changed while training; "
                                   "rebuild the recipe and restart the run") from None
            out[k] = arr
        return torch.from_numpy(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class _Batches(torch.utils.data.Dataset):
    """Item ``(epoch, b)`` = batch ``b`` of ``epoch`` for one rank, decoded, augmented and normalised (run in
    the DataLoader's workers, which keep each epoch's permutation)."""

    def __init__(self, loader: "StreamLoader"):
        self.loader, self._perms = loader, {}

    def __len__(self) -> int:
        return self.loader.steps_per_epoch

    def __getitem__(self, key):
        epoch, index = int(key[0]), int(key[1])
        if epoch not in self._perms:  # once per worker and epoch
            self._perms = {epoch: self.loader.permutation(epoch)}
        idx = self.loader.batch_indices(epoch, index, self._perms[epoch])
        images, tokens = self.loader.assemble(epoch, index, idx, torch.device("cpu"))
        return epoch, index, images, tokens, idx


def _worker_init(_):
    bind_to_parent()  # dies with the trainer, even after kill -9 and under the fork server (W&B on)
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
        captions = [self.data.captions[i] for i in idx.tolist()]
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
        keys = [(e, i) for e in range(epoch, last) for i in range(start if e == epoch else 0, self.steps_per_epoch)]
        # Like clipgen.utils.process_pool: fork only while no other thread runs (W&B's would make it unsafe).
        method = "fork" if threading.active_count() == 1 else "forkserver"
        dl = torch.utils.data.DataLoader(
            _Batches(self), batch_size=None, sampler=keys, num_workers=self.workers, prefetch_factor=self.prefetch,
            worker_init_fn=_worker_init, multiprocessing_context=mp.get_context(method),
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
        data = load_stream_data(recipe_dir, px, manifest, workers=workers, on_bad_sample=policy)
        return kind, data, StreamLoader(data, batch, seed, px, tokenizer, device, workers=workers,
                                        epochs=int(tc.epochs), **shard)
    data = load_train_data(recipe_dir, tokenizer, px, manifest, workers=workers, on_bad_sample=policy,
                           max_memory_gb=float(d.max_memory_gb))
    return kind, data, EpochLoader(data, batch, seed, px, device, **shard)


__all__ = ["StreamData", "StreamLoader", "load_stream_data", "choose_loader", "make_loader", "LOADERS",
           "derive_seed"]
