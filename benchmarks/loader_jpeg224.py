"""Training-loader throughput at the paper's shape: 224 px JPEG shards, clipgen against open_clip's own loaders.

    python benchmarks/loader_jpeg224.py [--root DIR] [--epochs 2] [--workers 2] [--batch-size 128]
                                        [--repeats 3] [--sides stream,memory,wds,csv] [overrides ...]

The world is drawn at 320 px (DomainNet's and ImageNet's images are larger than 224 px too) and the default world's
cg_high recipe and its base corpus are written as 224 px JPEG shards (quality 95): about 8k samples, so that
start-up does not dominate. Every side serves the same samples for the same epochs, batch size and workers:

(s) clipgen streaming (``data.loader=stream``): ``load_stream_data`` opens the shards' sample index (timed), then
    ``StreamLoader`` reads, decodes, crops and normalises each batch in W DataLoader workers.
(m) clipgen in memory: ``load_train_data`` decodes every shard once in W processes (timed), then ``EpochLoader``
    crops and normalises each batch in the main process.
(w) open_clip's webdataset pipeline over the same shards: ``open_clip_train.data.get_wds_dataset`` (shard and
    sample shuffle, ``decode("pilrgb")``, open_clip's training preprocess, its tokenizer, ``batched``, a
    ``WebLoader`` with W persistent workers), as open_clip_train builds it for ``--train-data``.
(c) open_clip's ``CsvDataset`` over the world's images as files (320 px PNGs, resized by the crop), with the same
    preprocess and a torch DataLoader (shuffle, drop_last, W workers).

Printed per side: samples/s over the whole run (start-up included) and, for clipgen's loaders, after start-up; CPU
time per sample of the main process and its workers together (less sensitive to other jobs than wall time); the
bytes per sample that reach the trainer from worker processes; and, once, the per-image cost of decoding the
shards' JPEGs (PIL vs clipgen's decoder) and of the crop + normalisation (batched grid_sample vs clipgen's).
Sides alternate, --repeats times; each side's best run counts, printed with the 1-minute load average at its
start. Floor: streaming >= 1.5x the webdataset pipeline
(whole run, start-up included); the exit status is 1 below it.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (bench_parser, bench_root, batch_bytes, loader_config, num_samples, paper_csv,  # noqa: E402
                     recipe_shards, run_clipgen, run_csv, timed, warm_cache, world_and_recipe)

from clipgen.config import compose_config  # noqa: E402  (after _common set the environment)

FLOOR = 1.5
SHAPE = ("world=default", "recipe=cg_high", "world.render_px=320", "world.image_px=320", "recipe.image_px=224",
         "recipe.image_format=jpg", "model=rn50", "model.image_px=224")  # explicit: whatever the px defaults


def run_wds(shards, n_samples, tokenizer, px, batch, epochs, workers, seed) -> dict:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    def run(t0):
        args = Namespace(train_data="::".join(map(str, shards)), train_num_samples=n_samples, seed=seed,
                         dataset_resampled=False, train_data_upsampling_factors=None, batch_size=batch,
                         workers=workers, world_size=1)
        info = get_wds_dataset(args, open_clip.image_transform(px, is_train=True), True, tokenizer=tokenizer)
        n = moved = 0
        for epoch in range(epochs):
            info.set_epoch(epoch)
            for images, texts in info.dataloader:
                n += images.shape[0]
                moved += batch_bytes(images, texts)
        del info  # persistent workers: shut down inside the timed run
        return {"samples": n, "start_seconds": 0.0, "bytes_per_sample": moved / max(n, 1)}
    return timed(run)


def _best_ms(fn, items: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / items * 1e3


def kernel_costs(shards, px: int, limit: int = 256) -> dict[str, float]:
    """ms per image, one thread: decoding the shards' first ``limit`` JPEGs with PIL (webdataset's pilrgb, the
    old clipgen decoder) and with clipgen's decoder; cropping + normalising a batch of them with the batched
    grid_sample (the old crop) and with clipgen's separable crop."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from clipgen.train.crop import apply_crop, crop_normalize, normalize
    from clipgen.train.data import crop_theta
    from clipgen.train.decode import decode_rgb, read_shard

    raws = [parts["jpg"] for shard in shards for _, parts, _ in read_shard(str(shard))[0]][:limit]

    def pil(raw):
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))

    images = torch.from_numpy(np.stack([decode_rgb(r) for r in raws[:128]]))
    theta = crop_theta(len(images), torch.Generator().manual_seed(0))
    return {"load": os.getloadavg()[0], "decode PIL": _best_ms(lambda: [pil(r) for r in raws], len(raws)),
            "decode clipgen": _best_ms(lambda: [decode_rgb(r) for r in raws], len(raws)),
            "crop grid_sample": _best_ms(lambda: normalize(apply_crop(images.float().div_(255.0), theta, px)),
                                         len(images)),
            "crop clipgen": _best_ms(lambda: crop_normalize(images, theta, px), len(images))}


def main() -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default="stream,memory,wds,csv", help="comma-separated subset of the sides")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the main process, every side (2 shared cores; workers use one thread each)
    with bench_root(args.root, "clipgen-jpeg224-") as root:
        return bench(args, root)


def bench(args, root: Path) -> int:
    import open_clip
    import pandas as pd
    import torch

    cfg = compose_config([*SHAPE, f"paths.root={root}", *args.overrides])
    recipe_dir, manifest = world_and_recipe(cfg)
    shards, n_samples = recipe_shards(recipe_dir, manifest), num_samples(manifest)
    tokenizer = open_clip.get_tokenizer(cfg.model.name)
    px, seed, batch, w, e = int(cfg.model.image_px), int(cfg.trainer.seed), args.batch_size, args.workers, args.epochs
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="clipgen-jpeg224-csv-") as tmp:
        csv, _ = paper_csv(cfg, Path(tmp))
        warm_cache(shards + (pd.read_csv(csv, sep="\t")["filepath"].tolist() if "csv" in sides else []))
        costs = kernel_costs(shards, px)
        stream_cfg, memory_cfg = (loader_config(cfg, kind, w, batch, e) for kind in ("stream", "memory"))
        run = {"stream": lambda: run_clipgen(stream_cfg, recipe_dir, manifest, tokenizer),
               "memory": lambda: run_clipgen(memory_cfg, recipe_dir, manifest, tokenizer),
               "wds": lambda: run_wds(shards, n_samples, tokenizer, px, batch, e, w, seed),
               "csv": lambda: run_csv(csv, tokenizer, px, batch, e, w, seed)}
        runs = {s: [] for s in sides}
        for i in range(max(1, args.repeats)):
            for s in sides:
                r = run[s]()
                runs[s].append(r)
                print(f"run {i + 1} {s:6s} {r['samples_per_s']:6.0f} samples/s  ({r['samples']} in "
                      f"{r['seconds']:.1f} s, start {r['start_seconds']:.1f} s, load {r['load']:.2f})", flush=True)
    best = {s: max(rs, key=lambda r: r["samples_per_s"]) for s, rs in runs.items()}
    names = {"stream": "clipgen stream", "memory": "clipgen memory", "wds": "open_clip webdataset",
             "csv": "open_clip CsvDataset"}
    print(f"\n== {n_samples} samples (recipe + base) as {px} px JPEG shards, batch {batch}, {e} epochs, {w} workers, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, best of {args.repeats} ==")
    print(f"per image, 1 thread (load {costs['load']:.2f}): decode PIL {costs['decode PIL']:.3f} ms vs clipgen "
          f"{costs['decode clipgen']:.3f} ms ({costs['decode PIL'] / costs['decode clipgen']:.2f}x); crop + normalise "
          f"grid_sample {costs['crop grid_sample']:.3f} ms vs clipgen {costs['crop clipgen']:.3f} ms "
          f"({costs['crop grid_sample'] / costs['crop clipgen']:.2f}x)")
    for s, r in best.items():
        steady = r["samples"] / max(r["seconds"] - r["start_seconds"], 1e-9)
        print(f"{names[s]:22s} {r['samples_per_s']:6.0f} samples/s whole run, {steady:6.0f} after start-up "
              f"({r['start_seconds']:.1f} s); CPU {r['cpu'] / r['samples'] * 1e3:.2f} ms/sample; "
              f"{r['bytes_per_sample'] / 1e3:.1f} kB/sample from workers; load {r['load']:.2f}")
    ok = True
    for ours in ("stream", "memory"):
        for theirs in ("wds", "csv"):
            if ours in best and theirs in best:
                ratio = best[ours]["samples_per_s"] / best[theirs]["samples_per_s"]
                floor = FLOOR if (ours, theirs) == ("stream", "wds") else None
                verdict = "" if floor is None else f" (floor {floor:g}: {'met' if ratio >= floor else 'NOT met'})"
                ok &= floor is None or ratio >= floor
                print(f"ratio {names[ours]} / {names[theirs]}: {ratio:.2f}{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
