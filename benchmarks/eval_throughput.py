"""Evaluation throughput: clipgen's ``run_eval`` against the plain open_clip loop a user would otherwise write.

    python benchmarks/eval_throughput.py [--root DIR | --run-dir RUN] [--world default] [--repeats 2]

Both sides evaluate every checkpoint of the same run (6 checkpoints: the untrained epoch 0 + 5 epochs) on the
same test images (the test split of real and the run's test domain, over the run's classes) with the same
86 templates, class names and batch size, in this one process, with one torch thread each (the machine is
shared; one thread makes the comparison fair and stable):

- ours: ``clipgen.eval.run.run_eval`` on a fresh ``eval/`` directory, as clipgen-eval runs it (decodes the
  images once for all checkpoints, tokenises the prompts once, writes results.jsonl and the npz outputs).
- plain open_clip: per checkpoint ``open_clip.create_model_and_transforms(name, pretrained=checkpoint)``, the
  classifier from ``open_clip.build_zero_shot_classifier`` (10 classes per batch, as open_clip_train does), and
  a torch DataLoader over the image files with open_clip's preprocess transform; logits = 100 x cosine.

Prints images/s of both (images x checkpoints / wall seconds), their ratio (the issue's floor is 1.5) and the
share of top-1 predictions on which the two agree. Without --run-dir it first trains the run it measures with
run_train (tiny model, 5 epochs, no W&B) under --root; a second call with the same --root reuses it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from clipgen.config import compose_config  # noqa: E402  (after the environment is set)


def make_run(root: str, world: str) -> Path:
    """A finished run with 6 checkpoints (epoch 0..5) of the tiny CLIP on ``world``."""
    from clipgen.train.loop import run_train

    cfg = compose_config([f"paths.root={root}", f"world={world}", "model=tiny_rn", "recipe=cg_high",
                          "trainer.epochs=5", "trainer.batch_size=128", "trainer.threads=1", "optim.warmup_steps=20",
                          "logger=none", "run_name=bench-eval-throughput"])
    t0 = time.time()
    out = run_train(cfg)
    print(f"run: {out['run_dir']} ({'reused' if out.get('skipped') else f'trained in {time.time() - t0:.0f} s'})")
    return Path(out["run_dir"])


def ours(run_dir: Path, batch_size: int) -> tuple[float, dict]:
    """Wall seconds of run_eval on a fresh eval/ directory, and its predictions per epoch."""
    import numpy as np

    from clipgen.eval.run import run_eval

    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    cfg = compose_config([f"paths.root={run_dir.parent.parent}", f"eval.run_dir={run_dir}",
                          f"eval.batch_size={batch_size}", "eval.templates=paper86", "eval.save_outputs=true",
                          "trainer.threads=1", "logger=none"])
    t0 = time.time()
    run_eval(cfg)
    seconds = time.time() - t0
    preds = {}
    for f in sorted((run_dir / "eval" / "outputs").glob("epoch_*.npz")):
        z = np.load(f)
        preds[int(f.stem.split("_")[1])] = (list(z["sample_ids"]), z["preds"])
    return seconds, preds


def plain_open_clip(run_dir: Path, batch_size: int, workers: int) -> tuple[float, dict]:
    """The hand-written open_clip loop over every checkpoint; wall seconds and predictions per epoch."""
    import json

    import open_clip
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from clipgen.rundir import checkpoints as list_checkpoints
    from clipgen.eval.testsets import select_test_samples, task_domains
    from clipgen.facts import zeroshot_templates
    from clipgen.models.factory import register_clipgen_models

    register_clipgen_models()
    meta = json.loads((run_dir / "meta.json").read_text())
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    samples = select_test_samples(run_cfg, meta, run_dir / "meta.json", task_domains(meta))
    classes, templates = list(meta["classes"]), list(zeroshot_templates("paper86"))
    index = {c: i for i, c in enumerate(classes)}

    class Files(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            with Image.open(samples[i].path) as im:
                return self.transform(im.convert("RGB")), index[samples[i].class_name]

    tokenizer = open_clip.get_tokenizer(meta["model_name"])
    t0 = time.time()
    preds = {}
    for epoch, path in list_checkpoints(run_dir):
        model, _, preprocess = open_clip.create_model_and_transforms(meta["model_name"], pretrained=str(path))
        model.eval()
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates,
                                                          num_classes_per_batch=10, device="cpu")
        loader = torch.utils.data.DataLoader(Files(preprocess), batch_size=batch_size, num_workers=workers)
        out = []
        with torch.inference_mode():
            for images, _target in loader:
                features = model.encode_image(images, normalize=True)
                out.append((100.0 * features @ classifier).argmax(dim=1))
        preds[epoch] = ([s.sample_id for s in samples], torch.cat(out).numpy())
    return time.time() - t0, preds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="paths.root for the run to measure (default: a temporary dir)")
    ap.add_argument("--run-dir", default=None, help="measure this existing run instead of training one")
    ap.add_argument("--world", default="default", help="world preset of the run trained here (tiny | default)")
    ap.add_argument("--batch-size", type=int, default=512, help="images per forward pass, both sides")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain loop (default 0)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds (ours, plain, ours, ...)")
    args = ap.parse_args()

    import logging

    import torch

    logging.disable(logging.INFO)  # keep per-checkpoint progress lines out of the table
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else make_run(
        args.root or tempfile.mkdtemp(prefix="clipgen-eval-bench-"), args.world)
    import contextlib
    import io

    times = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        with contextlib.redirect_stdout(io.StringIO()):  # run_eval's tables
            t_ours, p_ours = ours(run_dir, args.batch_size)
        t_plain, p_plain = plain_open_clip(run_dir, args.batch_size, args.workers)
        times["ours"].append(t_ours)
        times["plain"].append(t_plain)

    epochs = sorted(p_plain)
    n_images = len(p_plain[epochs[0]][0])
    total = n_images * len(epochs)
    agree = []
    for e in epochs:
        ids_o, pr_o = p_ours[e]
        ids_p, pr_p = p_plain[e]
        if list(map(str, ids_o)) != list(map(str, ids_p)):
            print(f"epoch {e}: the two sides saw the images in another order", file=sys.stderr)
            return 1
        agree.append(float((pr_o == pr_p).mean()))
    best_o, best_p = min(times["ours"]), min(times["plain"])
    print(f"\n== evaluation throughput: {len(epochs)} checkpoints x {n_images} images, batch {args.batch_size}, "
          f"1 torch thread, {os.cpu_count()} cores, plain DataLoader workers {args.workers} ==")
    print(f"{'':24}{'seconds (each round)':>28}{'best images/s':>16}")
    for name, label in (("ours", "clipgen run_eval"), ("plain", "open_clip plain loop")):
        each = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{label:24}{each:>28}{total / min(times[name]):>16.0f}")
    ratio = best_p / best_o
    print(f"ratio (ours / plain images/s, best rounds): {ratio:.2f}  "
          f"(median rounds: {statistics.median(times['plain']) / statistics.median(times['ours']):.2f}); "
          f"floor 1.5 -> {'met' if ratio >= 1.5 else 'NOT met'}")
    print(f"top-1 agreement per checkpoint: {', '.join(f'{a:.4f}' for a in agree)} (mean {statistics.mean(agree):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
