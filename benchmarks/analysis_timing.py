"""clipgen-analyze timing on one tiny synthetic-world run.

    python benchmarks/analysis_timing.py [--root DIR] [--preset fast] [--threads 2] [--extract-threads 1]

1. Full analysis set: ``run_analyze`` with every analysis (sae, geometry incl. both UMAP plots, cka, circuits)
   on one run (tiny world, tiny ModifiedResNet, CG-high, 2 epochs), from an empty analysis/ directory (no
   activation cache), once with --preset (default: ``fast``, the CI preset) and once with the shipped
   ``default`` settings. Also times the rerun, which must skip everything.
2. Activation extraction for all layers of the visual tower (stem, every residual block, attention pool) on the
   run's test images of all six domains (tiled to --min-images): ``activations.extract`` (forward hooks, ONE
   forward pass records every layer) against ``activations.extract_one_pass_per_layer`` (a full forward pass per
   layer); best of --repeats for each side, their ratio (acceptance: >= 2), and a check that both agree.

The run is trained under --root the first time (seconds) and reused afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from clipgen.config import compose_config  # noqa: E402  (after the environment is set)


def make_run(root: str) -> Path:
    from clipgen.launch.study import run_study

    runs = Path(root) / "runs"
    found = sorted(p for p in runs.glob("*") if (p / "eval" / "results.jsonl").is_file()) if runs.is_dir() else []
    if found:
        print(f"run: {found[0]} (reused)")
        return found[0]
    t0 = time.time()
    run_study(compose_config([f"paths.root={root}", "debug=smoke", "study.name=bench-analysis",
                              "study.recipes=[cg_high]", "study.seeds=[0]"]))
    found = sorted(p for p in runs.glob("*") if (p / "eval" / "results.jsonl").is_file())
    print(f"run: {found[0]} (trained and evaluated in {time.time() - t0:.0f} s)")
    return found[0]


def full_analysis(root: str, run_dir: Path, preset: str, threads: int) -> tuple[float, float, dict]:
    from clipgen.analyze.run import run_analyze

    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    cfg = compose_config([f"paths.root={root}", "debug=smoke", f"analysis={preset}", f"analysis.threads={threads}",
                          f"analysis.run_dirs=[{run_dir}]"])
    t0 = time.time()
    out = run_analyze(cfg)
    first = time.time() - t0
    t0 = time.time()
    again = run_analyze(cfg)
    rerun = time.time() - t0
    assert all(v == "up to date" for v in again["runs"][run_dir.name]["analyses"].values()), again
    return first, rerun, out["runs"][run_dir.name]["analyses"]


def extraction(run_dir: Path, repeats: int, threads: int, min_images: int) -> None:
    import numpy as np
    import torch

    from clipgen.analyze import activations as A
    from clipgen.analyze.data import load_run, select_images
    from clipgen.models.kinds import load_checkpoint

    info = load_run(run_dir)
    images = select_images(info, "test", 10_000, 0).decode(int(info.meta["image_px"])).images
    distinct = len(images)
    images = np.concatenate([images] * max(1, -(-min_images // distinct)))  # enough work to time reliably
    model, _, _ = load_checkpoint(info.checkpoint, info.meta, int(info.meta["image_px"]))
    layers = A.layer_names(model.visual)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    one, per = [], []
    try:
        for _ in range(repeats):  # interleaved, so a busy spell on the shared machine hits both sides
            t0 = time.perf_counter()
            a = A.extract(model, images, layers, batch_size=256)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = A.extract_one_pass_per_layer(model, images, layers, batch_size=256)
            per.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    same = all(np.allclose(a[n], b[n], atol=1e-6) for n in layers)
    n = len(images)
    print(f"\nactivation extraction, {len(layers)} layers ({', '.join(layers)}), {n} images ({distinct} distinct test "
          f"images of 6 domains, tiled), {threads} torch thread(s), best of {repeats}:")
    print(f"  {'one pass, all layers (hooks)':<34} {min(one):8.3f} s  ({n / min(one):8.0f} images/s)")
    print(f"  {'one pass per layer':<34} {min(per):8.3f} s  ({n / min(per):8.0f} images/s)")
    print(f"  ratio (per-layer / one-pass)       {min(per) / min(one):8.2f}x   (acceptance: >= 2)   "
          f"same activations: {same}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="paths.root holding (or receiving) the tiny run")
    p.add_argument("--preset", default="fast", help="analysis preset timed first (default: fast)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the issue's 2 cores)")
    p.add_argument("--repeats", type=int, default=5, help="extraction timings per side (best is reported)")
    p.add_argument("--extract-threads", type=int, default=1,
                   help="torch threads for the extraction comparison (default 1: tiny ops gain nothing from a "
                        "second thread, and one thread is immune to a busy shared machine)")
    p.add_argument("--min-images", type=int, default=2048, help="tile the test images up to this many")
    p.add_argument("--only-extraction", action="store_true", help="skip the full-analysis timings")
    p.add_argument("--skip-default", action="store_true", help="time only --preset, not the default settings")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="clipgen-bench-analysis-")
    run_dir = make_run(root)
    presets = [args.preset] + ([] if args.skip_default or args.preset == "default" else ["default"])
    for preset in ([] if args.only_extraction else presets):
        first, rerun, parts = full_analysis(root, run_dir, preset, args.threads)
        print(f"\nfull analysis set, analysis={preset}, {args.threads} threads: {first:.1f} s "
              f"(rerun, all up to date: {rerun:.2f} s)")
        for name, how in parts.items():
            print(f"  {name:<9} {how}")
    extraction(run_dir, args.repeats, args.extract_threads, args.min_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
