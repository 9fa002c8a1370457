"""Training throughput and peak memory: ``clipgen-train`` against ``python -m open_clip_train.main``, side by side.

    python benchmarks/train_throughput.py [--root DIR] [--epochs 2] [--workers 2] [--batch-size 128]
                                          [--threads 1] [--repeats 2] [--precision fp32] [overrides ...]

Both sides train the same model config (default: clipgen-tiny-rn, 32 px) from scratch on the same recipe shards
(the default world's cg_high recipe plus its base corpus, as webdataset tars) with the same global batch, epochs,
precision, learning rate, warmup, weight decay, loader workers and torch threads, and save a checkpoint per
epoch. Each side is a fresh process, timed from start to exit (startup, data loading, checkpoints included), so
the ratio is what a user waits. Samples/s = samples trained / wall seconds. Peak memory is the largest resident
set of any process of the side (main process or a loader worker), from getrusage of its process tree.

open_clip's side is its own trainer (``open_clip_train.main``) in a process that first registers clipgen's model
configs (``open_clip.add_model_config``), so it builds the identical model. The two sides alternate
``--repeats`` times and each side's best run counts; every run is printed. With one torch thread on a 2-core
machine both sides train on one core (open_clip's loader workers use the other) and measure the same; with every
core (the default, what torch does by itself) clipgen's pre-decoded data leave the cores to training.
Acceptance: samples/s ratio >= 1.0 and peak memory no higher, within 1% (importing torch and open_clip alone
takes ~760 MB here, and the sides' peaks differ by a few MB from run to run); the exit status is 1 otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_parser, bench_root, num_samples, world_and_recipe  # noqa: E402

from clipgen.config import compose_config  # noqa: E402  (after _common set the environment)

FLOOR = 1.0
MEMORY_TOLERANCE = 1.01

_RUN = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode; "
        "s = time.perf_counter() - t; "
        "print(json.dumps({'rc': rc, 'seconds': s, "
        "'max_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
_OPEN_CLIP = ("import sys; from clipgen.models.factory import register_clipgen_models; register_clipgen_models(); "
              "from open_clip_train.main import main; main(sys.argv[1:])")


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` in a fresh measuring process: wall seconds and the peak RSS of its process tree."""
    out = subprocess.run([sys.executable, "-c", _RUN, *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"benchmark side failed: {' '.join(cmd[:6])} ...\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"benchmark side exited with {res['rc']}: {' '.join(cmd[:6])} ...")
    return res


def main() -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the training process, both sides (default: every core, as torch does)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 (clipgen) = fp32 | pure_bf16/amp_bf16 ...")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (both sides' data), e.g. model=tiny_vit")
    args = ap.parse_args()
    with bench_root(args.root, "clipgen-train-bench-") as root:
        return bench(args, root)


def bench(args, root: Path) -> int:
    import torch

    cfg = compose_config(["world=default", "recipe=cg_high", f"paths.root={root}", *args.overrides])
    recipe, manifest = world_and_recipe(cfg)
    base = (recipe / manifest["base"]["dir"]).resolve()
    n = num_samples(manifest)
    shards = "::".join(f"{d}/shard-{{00000..{len(s) - 1:05d}}}.tar"
                       for d, s in ((recipe, manifest["shards"]), (base, manifest["base"]["shards"])))
    model, px = cfg.model.name, int(cfg.model.image_px)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    ours_cmd = ["clipgen-train", f"paths.root={root}", "world=default", "recipe=cg_high", *args.overrides,
                "logger=none", f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}",
                f"trainer.threads={args.threads}", f"data.workers={args.workers}",
                f"trainer.precision={args.precision}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
                "trainer.save_every_steps=1000000"]
    oc_precision = {"fp32": "fp32", "bf16": "amp_bf16"}.get(args.precision, args.precision)
    steps = n // args.batch_size
    runs = {"clipgen": [], "open_clip": []}
    for i in range(max(1, args.repeats)):
        shutil.rmtree(root / "runs", ignore_errors=True)
        ours = measure([*ours_cmd, f"run_name=bench{i}"], env)
        logs = root / "oc_logs"
        shutil.rmtree(logs, ignore_errors=True)
        theirs = measure([sys.executable, "-c", _OPEN_CLIP, "--train-data", shards, "--dataset-type", "webdataset",
                          "--train-num-samples", str(n), "--model", model, "--batch-size", str(args.batch_size),
                          "--epochs", str(args.epochs), "--workers", str(args.workers), "--device", "cpu",
                          "--precision", oc_precision, "--logs", str(logs), "--name", f"oc{i}", "--lr", str(args.lr),
                          "--wd", "0.2", "--warmup", str(args.warmup), "--save-frequency", "1",
                          "--report-to", "", "--seed", "0", "--log-every-n-steps", "1000000"], env)
        for side, res in (("clipgen", ours), ("open_clip", theirs)):
            res["samples"] = steps * args.batch_size * args.epochs
            res["samples_per_s"] = res["samples"] / res["seconds"]
            runs[side].append(res)
        print(f"run {i + 1}: clipgen {ours['samples_per_s']:.0f} samples/s ({ours['seconds']:.1f} s, "
              f"{ours['max_rss_mb']:.0f} MB), open_clip_train {theirs['samples_per_s']:.0f} samples/s "
              f"({theirs['seconds']:.1f} s, {theirs['max_rss_mb']:.0f} MB)")
    ours, theirs = (max(runs[k], key=lambda r: r["samples_per_s"]) for k in ("clipgen", "open_clip"))
    ratio = ours["samples_per_s"] / theirs["samples_per_s"]
    mem_ours, mem_theirs = min(r["max_rss_mb"] for r in runs["clipgen"]), min(r["max_rss_mb"] for r in
                                                                              runs["open_clip"])
    print(f"\n== training {model} at {px} px: {n} samples x {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.precision}, {args.workers} workers, {args.threads} torch threads, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, best of {len(runs['clipgen'])} ==")
    print(f"clipgen-train          {ours['samples_per_s']:8.0f} samples/s  ({ours['seconds']:.1f} s)   peak RSS "
          f"{mem_ours:6.0f} MB")
    print(f"open_clip_train.main   {theirs['samples_per_s']:8.0f} samples/s  ({theirs['seconds']:.1f} s)   peak RSS "
          f"{mem_theirs:6.0f} MB")
    met = ratio >= FLOOR and mem_ours <= mem_theirs * MEMORY_TOLERANCE
    print(f"ratio {ratio:.2f} (floor {FLOOR:g}); peak memory {mem_ours:.0f} vs {mem_theirs:.0f} MB (ratio "
          f"{mem_ours / mem_theirs:.3f}, at most {MEMORY_TOLERANCE:g}): "
          f"{'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
