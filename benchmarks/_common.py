"""Setup and timing the benchmarks share, written once: the offline environment, a temporary paths.root, the
synthetic world + recipe, the recipe's shards, page-cache warming, the paper's CSV of image files, CPU-time
accounting, and the two loaders every loader benchmark compares (clipgen's, built by the trainer's own
``clipgen.train.stream.make_loader``, and open_clip_train's ``CsvDataset``).

Import it first (``sys.path.insert(0, <benchmarks>)``; ``from _common import ...``): it sets HF_HUB_OFFLINE and
WANDB_MODE before clipgen, open_clip or W&B are imported.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def bench_parser(description: str, batch_size: int | None = 128):
    """An argument parser with what the data-loading benchmarks share: --root, --epochs, --workers,
    --batch-size (``None``: the config's trainer.batch_size)."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="paths.root (default: a fresh temporary directory)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs on each side (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes on each side (default 2)")
    ap.add_argument("--batch-size", type=int, default=batch_size,
                    help=f"batch size (default: {batch_size or 'trainer.batch_size'})")
    return ap


@contextlib.contextmanager
def bench_root(root: str | None, prefix: str) -> Iterator[Path]:
    """``root`` as given (kept), or a fresh temporary directory that is removed afterwards (a world + recipe
    is ~80 MB; pass --root to keep one)."""
    path = Path(root or tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if root is None:
            shutil.rmtree(path, ignore_errors=True)


def world_and_recipe(cfg) -> tuple[Path, dict]:
    """Generate ``cfg``'s world and build its recipe (both skipped when already there); ``(recipe dir,
    manifest)``."""
    from clipgen.recipes.build import ensure_recipe
    from clipgen.world.generate import generate_world

    t0 = time.time()
    generate_world(cfg)
    recipe_dir = Path(ensure_recipe(cfg))
    manifest = json.loads((recipe_dir / "manifest.json").read_text())
    print(f"world + recipe ready in {time.time() - t0:.1f} s: {num_samples(manifest)} samples (recipe + base) in "
          f"{recipe_dir}", flush=True)
    return recipe_dir, manifest


def num_samples(manifest: dict) -> int:
    base = manifest.get("base")
    return int(manifest["num_samples"]) + (int(base["num_samples"]) if base else 0)


def recipe_shards(recipe_dir: Path, manifest: dict) -> list[Path]:
    """The recipe's shards, then its base corpus'."""
    base = manifest.get("base")
    return sorted(recipe_dir.glob("shard-*.tar")) + (sorted((recipe_dir / base["dir"]).glob("shard-*.tar"))
                                                     if base else [])


def warm_cache(paths) -> None:
    """Read every file once, so that every side starts from a warm page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def paper_csv(cfg, out_dir: Path) -> tuple[Path, int]:
    """A tab-separated CSV (filepath, title) of the recipe's and the base corpus' images as individual files,
    with the captions the recipe's shards hold: the paper's input to open_clip_train's ``CsvDataset``."""
    import pandas as pd

    from clipgen.data.sources import base_index
    from clipgen.recipes.build import plan_from_config
    from clipgen.recipes.captions import make_caption

    plan, _ = plan_from_config(cfg)
    rows = [(s.path, make_caption(cfg.recipe.caption_seed, s.sample_id, s.domain, s.class_name,
                                  plan.spec.aligned_captions)) for s in plan.samples]
    rows += [(s.path, s.caption or "") for s in base_index(cfg)]
    path = out_dir / "train.csv"
    pd.DataFrame(rows, columns=["filepath", "title"]).to_csv(path, sep="\t", index=False)
    return path, len(rows)


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers, decode pools)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def batch_bytes(*tensors) -> int:
    return sum(t.element_size() * t.numel() for t in tensors)


def timed(run) -> dict:
    """``run(t0)`` (returns at least ``{"samples"}``) plus its wall ``seconds``, ``cpu`` seconds (with its worker
    processes), ``samples_per_s`` and the 1-minute ``load`` average at its start."""
    gc.collect()
    load, cpu0, t0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    out = run(t0)
    gc.collect()  # the side's worker processes exit and are reaped inside its own time and CPU count
    out.update(seconds=time.perf_counter() - t0, cpu=cpu_seconds() - cpu0, load=load)
    out["samples_per_s"] = out["samples"] / out["seconds"]
    return out


def loader_config(cfg, kind: str, workers: int, batch_size: int, epochs: int):
    """``cfg`` with ``data.loader=kind`` and the benchmark's workers, batch size and epochs."""
    from omegaconf import open_dict

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.loader, cfg.data.workers = kind, int(workers)
        cfg.trainer.batch_size, cfg.trainer.epochs = int(batch_size), int(epochs)
    return cfg


def run_clipgen(cfg, recipe_dir: Path, manifest: dict, tokenizer) -> dict:
    """clipgen's training loader as the trainer builds it (``make_loader``: data.loader memory or stream) over
    ``trainer.epochs`` epochs. Start-up (the memory loader's decode, the streaming loader's index) is
    timed as part of the run and reported as ``start_seconds``; ``bytes_per_sample`` is what reaches the main
    process from worker processes (the streaming loader's batches; the memory loader has no workers then)."""
    from clipgen.train.stream import make_loader

    def run(t0):
        kind, data, loader = make_loader(cfg, recipe_dir, manifest, tokenizer)
        start = time.perf_counter() - t0
        n = moved = 0
        for epoch in range(int(cfg.trainer.epochs)):
            for b in loader.batches(epoch):
                n += b.images.shape[0]
                moved += batch_bytes(b.images, b.tokens, b.indices) if kind == "stream" else 0
        del loader, data
        return {"samples": n, "start_seconds": start, "bytes_per_sample": moved / max(n, 1)}
    return timed(run)


def run_csv(csv: Path, tokenizer, px: int, batch: int, epochs: int, workers: int, seed: int) -> dict:
    """The paper's path: open_clip_train's ``CsvDataset`` with open_clip's training preprocess
    (``image_transform(px, is_train=True)``: RandomResizedCrop(0.9-1.0, bicubic), ToTensor, Normalize) and a
    torch DataLoader (shuffle, drop_last, ``workers`` workers) as open_clip_train's ``get_csv_dataset`` builds it."""
    import open_clip
    import torch
    from open_clip_train.data import CsvDataset
    from torch.utils.data import DataLoader

    def run(t0):
        dataset = CsvDataset(str(csv), open_clip.image_transform(px, is_train=True), img_key="filepath",
                             caption_key="title", sep="\t", tokenizer=tokenizer)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        n = moved = 0
        for _ in range(epochs):
            for images, texts in loader:
                n += images.shape[0]
                moved += batch_bytes(images, texts)
        del loader
        return {"samples": n, "start_seconds": 0.0, "bytes_per_sample": moved / max(n, 1)}
    return timed(run)
