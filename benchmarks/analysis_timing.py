"""clipgen-analyze timing and the bounds its analyses are read with.

    python benchmarks/analysis_timing.py [--root DIR] [--run-dir RUN] [--preset fast] [--threads 2]
    python benchmarks/analysis_timing.py --run-dir RUN --presets study --epochs 0,-1 --ig-steps 10,20,50
    python benchmarks/analysis_timing.py --study-root ROOT --study-name world_mech

1. Full analysis set: ``run_analyze`` with every analysis (sae, geometry incl. both UMAP plots unless the preset
   turns them off, cka, circuits) from an empty analysis/ directory (no activation cache), once per preset
   (default: ``fast``, the CI preset, then the shipped ``default`` settings), at ``--epochs``: wall and CPU
   seconds (``time.process_time``, all threads) per analysis, and the rerun, which must skip everything. The run
   is a tiny CG-high smoke run trained under --root the first time (seconds), or ``--run-dir`` (e.g. a copy of a
   default-world run: the analyses write into its analysis/ folder).
2. Activation extraction for all layers of the visual tower (stem, every residual block, attention pool) on the
   run's test images of all six domains (tiled to --min-images): ``activations.extract`` (forward hooks, ONE
   forward pass records every layer) against ``activations.extract_one_pass_per_layer`` (a full forward pass per
   layer); best of --repeats for each side, their ratio (acceptance: >= 2), and a check that both agree.
3. ``--ig-steps``: integrated gradients of the circuits at several step counts on the run's held-out test images
   (10 per domain x class): per layer the mean completeness gap relative to |M(x) - M(0)|, and how far the kept
   nodes (top 10% channels per domain x class) at each step count agree with those at the largest (Jaccard).
4. ``--sae-seeds``: the SAE refitted with other seeds on the same embeddings (settings of the last preset): the
   test domain's sharing score and the code density per seed, i.e. the SAE's own noise in the score;
   ``--sae-steps`` also fits the first seed for longer (does the density come from stopping early?).
5. ``--study-root``: the CPU seconds every analysis of every run under that root recorded (``cpu_seconds`` in
   its JSON; a result copied from a run with the same weights counts the copy), summed per analysis and epoch.

The machine's load average is printed with every timing: on a shared machine CPU seconds are the number to
compare, wall seconds grow with the load.
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


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def full_analysis(root: str, run_dir: Path, preset: str, threads: int, epochs: str,
                  smoke: bool) -> tuple[float, float, float, dict]:
    """(wall s, CPU s, rerun wall s, {epoch: {analysis: (wall s, CPU s)}}) of every analysis from scratch."""
    import json

    from clipgen.analyze import store
    from clipgen.analyze.run import run_analyze

    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    cfg = compose_config([f"paths.root={root}", *(["debug=smoke"] if smoke else []), f"analysis={preset}",
                          f"analysis.threads={threads}", f"analysis.run_dirs=[{run_dir}]",
                          f"analysis.epochs=[{epochs}]"])
    t0, c0 = time.time(), time.process_time()
    out = run_analyze(cfg)
    first, cpu = time.time() - t0, time.process_time() - c0
    t0 = time.time()
    again = run_analyze(cfg)
    rerun = time.time() - t0
    assert all(v == "up to date" for e in again["runs"][run_dir.name]["epochs"].values()
               for v in e["analyses"].values()), again
    parts = {}
    for epoch in out["runs"][run_dir.name]["epochs"]:
        for name in out["analyses"]:
            res = json.loads((store.epoch_dir(run_dir, epoch) / f"{name}.json").read_text())
            parts.setdefault(epoch, {})[name] = (res["seconds"], res["cpu_seconds"])
    return first, cpu, rerun, parts


def ig_steps(run_dir: Path, steps_list: list[int], threads: int) -> None:
    import numpy as np
    import torch

    from clipgen.analyze import circuits as C
    from clipgen.analyze.activations import stages
    from clipgen.analyze.data import load_run, select_images
    from clipgen.facts import zeroshot_templates
    from clipgen.models.kinds import load_checkpoint
    from clipgen.models.zeroshot import class_embeddings, model_logit_scale, normalize_images

    torch.set_num_threads(threads)
    info = load_run(run_dir)
    px = int(info.meta["image_px"])
    model, tok, _ = load_checkpoint(info.checkpoint, info.meta, px)
    for p in model.parameters():
        p.requires_grad_(False)
    t = select_images(info, "test", 10, 0).decode(px)
    sel = np.flatnonzero(np.isin(t.labels, info.heldout_idx))
    x, y = normalize_images(torch.from_numpy(t.images[sel])), torch.as_tensor(t.labels[sel])
    groups = np.array([f"{d}|{lab}" for d, lab in zip(t.domains[sel], t.labels[sel])])
    with torch.no_grad():
        metric = C.true_class_logit(class_embeddings(model, tok, info.classes, list(zeroshot_templates("paper86")),
                                                     "cpu"), model_logit_scale(model))
    st, kept = stages(model.visual), {}
    print(f"\nintegrated gradients on {len(sel)} held-out test images of {run_dir.name}, epoch {info.epoch} "
          f"({threads} thread(s), {_load()}):")
    for steps in sorted(steps_list):
        c0 = time.process_time()
        with torch.enable_grad():
            attrs, full, zeros = C.node_attributions(st, x, y, metric, steps)
        cpu = time.process_time() - c0
        rel = [float((a.sum(1) - (full - z)).abs().mean() / (full - z).abs().mean().clamp_min(1e-12))
               for a, z in zip(attrs, zeros)]
        kept[steps] = {g: [C.top_nodes(a[torch.from_numpy(groups == g)].double().mean(0).numpy(), 0.1)
                           for a in attrs] for g in np.unique(groups)}
        print(f"  {steps:>3} steps: node attributions {cpu:6.1f} CPU s; relative completeness gap per layer "
              + " ".join(f"{r:.3f}" for r in rel))
    ref = max(steps_list)
    for steps in sorted(steps_list)[:-1]:
        jac = np.mean([[C.jaccard(a, b) for a, b in zip(kept[steps][g], kept[ref][g])] for g in kept[ref]], axis=0)
        print(f"  kept nodes at {steps} vs {ref} steps, Jaccard per layer: " + " ".join(f"{v:.3f}" for v in jac))


def sae_seeds(root: str, run_dir: Path, seeds: list[int], preset: str, steps_list: list[int]) -> None:
    """The SAE's own noise: refit it with other seeds (and step counts) on the same embeddings; the test domain's
    sharing score (C2) and the code density per fit."""
    import numpy as np

    from clipgen.analyze import sharing
    from clipgen.analyze.data import load_run, select_images
    from clipgen.analyze.run import Context
    from clipgen.analyze.sae import encode, train_sae
    from clipgen.facts import DOMAINS

    cfg = compose_config([f"paths.root={root}", f"analysis={preset}"])
    a = cfg.analysis
    ctx = Context(cfg, load_run(run_dir), "cpu")
    fit = ctx.embeddings(select_images(ctx.info, "train", int(a.sae_fit_per_group), int(a.seed)))
    test = ctx.embeddings()
    d = ctx.info.meta["test_domain"]
    print(f"\nSAE refitted with other seeds on {run_dir.name}, epoch {ctx.info.epoch} (analysis={preset}; {_load()}):")
    scores = []
    for seed, steps in [(seed, int(a.sae_steps)) for seed in seeds] + [(seeds[0], n) for n in steps_list]:
        c0 = time.process_time()
        model, summary = train_sae(fit, int(a.sae_expansion) * fit.shape[1], steps, int(a.sae_batch_size),
                                   float(a.sae_lr), float(a.sae_l1), seed)
        hist, counts = sharing.histograms(encode(model, test), ctx.test.domains, ctx.test.labels, DOMAINS,
                                          ctx.info.heldout_idx, int(a.sae_top_active))
        score = sharing.domain_scores(sharing.share_matrix(hist, counts, list(a.sae_ks)), DOMAINS)[d]
        if steps == int(a.sae_steps):
            scores.append(score)
        print(f"  seed {seed}, {steps} steps: {d} sharing score {score:.3f}, mean L0 {summary['mean_l0']:.1f} of "
              f"{summary['num_features']}, explained variance {summary['explained_variance']:.3f} "
              f"({time.process_time() - c0:.0f} CPU s)")
    if len(scores) > 1:
        print(f"  spread over seeds at {a.sae_steps} steps: {min(scores):.3f}-{max(scores):.3f} "
              f"(sd {np.std(scores, ddof=1):.3f})")


def study_cpu(root: str, name: str | None) -> None:
    """CPU seconds recorded by every analysis result under ``root/runs`` (``name``: that study's runs only)."""
    from clipgen.analyze import store

    runs = sorted(p for p in (Path(root) / "runs").glob("*") if (p / "meta.json").is_file())
    if name:
        from clipgen.recipes.grid import run_dir_of, study_runs

        cfg = compose_config([f"experiment={name}", f"paths.root={root}"])
        runs = [run_dir_of(sub) for _, sub in study_runs(cfg)]
    total: dict = {}
    for run in runs:
        for epoch in store.analysed_epochs(run):
            for an, res in store.read_epoch(run, epoch).items():
                kind = "copied" if res.get("reused_from") else "computed"
                rec = total.setdefault((epoch > 0, an, kind), [0, 0.0, 0.0])
                rec[0] += 1
                rec[1] += float(res.get("cpu_seconds") or 0)
                rec[2] += float(res.get("seconds") or 0)
    print(f"\nanalysis CPU time recorded under {root} ({len(runs)} runs):")
    grand = 0.0
    for (trained, an, kind), (n, cpu, wall) in sorted(total.items()):
        grand += cpu
        print(f"  {'last epoch' if trained else 'epoch 0':<10} {an:<9} {kind:<8} {n:>3} results  {cpu:8.0f} CPU s "
              f"({cpu / n:6.1f} per result; wall {wall:8.0f} s)")
    print(f"  total {grand:.0f} CPU s = {grand / 3600:.2f} CPU hours")


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
    p.add_argument("--run-dir", default=None, help="time on this run instead (its analysis/ folder is replaced)")
    p.add_argument("--presets", default="fast,default",
                   help="analysis presets timed, comma-separated ('' times none)")
    p.add_argument("--epochs", default="-1", help="analysis.epochs, comma-separated (e.g. 0,-1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machine's 2 cores)")
    p.add_argument("--repeats", type=int, default=5, help="extraction timings per side (best is reported)")
    p.add_argument("--extract-threads", type=int, default=1,
                   help="torch threads for the extraction comparison (default 1: tiny ops gain nothing from a "
                        "second thread, and one thread is immune to a busy shared machine)")
    p.add_argument("--min-images", type=int, default=2048, help="tile the test images up to this many")
    p.add_argument("--skip-extraction", action="store_true", help="skip the extraction comparison")
    p.add_argument("--ig-steps", default="", help="step counts for the completeness section, e.g. 10,20,50")
    p.add_argument("--sae-seeds", default="", help="refit the SAE with these seeds, e.g. 0,1,2 (its own noise)")
    p.add_argument("--sae-steps", default="", help="with --sae-seeds: also fit the first seed this many steps")
    p.add_argument("--study-root", default=None, help="only sum the CPU seconds recorded under this root")
    p.add_argument("--study-name", default=None,
                   help="with --study-root: only the runs of this experiment preset (e.g. world_mech)")
    args = p.parse_args()

    if args.study_root:
        study_cpu(args.study_root, args.study_name)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="clipgen-bench-analysis-")
    run_dir = Path(args.run_dir).resolve() if args.run_dir else make_run(root)
    for preset in [x for x in args.presets.split(",") if x]:
        first, cpu, rerun, parts = full_analysis(root, run_dir, preset, args.threads, args.epochs, not args.run_dir)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nfull analysis set, analysis={preset}, epochs [{args.epochs}], {args.threads} threads: {first:.1f} s "
              f"wall, {cpu:.1f} CPU s, peak RSS so far {peak:.0f} MB (rerun, all up to date: {rerun:.2f} s; "
              f"{_load()})")
        for epoch, by_name in parts.items():
            for name, (wall, c) in by_name.items():
                print(f"  epoch {epoch:>3} {name:<9} {wall:7.1f} s wall {c:7.1f} CPU s")
    if args.ig_steps:
        ig_steps(run_dir, [int(x) for x in args.ig_steps.split(",")], args.extract_threads)
    if args.sae_seeds:
        presets = [x for x in args.presets.split(",") if x]
        sae_seeds(root, run_dir, [int(x) for x in args.sae_seeds.split(",")], presets[-1] if presets else "default",
                  [int(x) for x in args.sae_steps.split(",") if x])
    if not args.skip_extraction:
        extraction(run_dir, args.repeats, args.extract_threads, args.min_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
