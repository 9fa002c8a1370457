"""clipgen-diff on two runs with 100k evaluation images: must finish in <= 60 s on 2 cores.

    python benchmarks/diff_timing.py [--images 100000] [--classes 345] [--emb-dim 1024] [--null] [--keep DIR]
                                     [--generators slice_diff,cluster]

Synthesises two runs' evaluation outputs in a temporary paths.root (``clipgen.diff.synthetic``: npz with
sample ids, domains, labels, preds, f16 logits over ``--classes`` classes, f16 embeddings of ``--emb-dim``
dims, plus meta.json and recipe manifests with a held-out-class gap in the test domain), with seed-like noise
everywhere and two planted differences (B fails on 30% of quickdraw; B better on sketch x axe). Then times
``run_diff`` end to end as clipgen-diff runs it (loading, split, the three generators, verification, scores,
plots, summary; logger=none), with at most 2 threads for numpy/BLAS. Prints the wall time, the per-generator
seconds and whether the planted differences are the accepted top hypotheses.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "2")  # the target machine has 2 cores
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402

from clipgen.config import compose_config  # noqa: E402  (after the environment is set)

LIMIT_S = 60.0


def synthesise(root: Path, n_images: int, n_classes: int, emb_dim: int, null: bool) -> None:
    from clipgen.diff import synthetic as syn
    from clipgen.facts import domainnet_classes

    classes = list(domainnet_classes()[:n_classes])
    heldout = ["aircraft carrier", "axe", "banana", "barn", "bed"]
    domains = ["clipart", "quickdraw", "real", "sketch"]
    per_cell = max(1, -(-n_images // (len(domains) * len(classes))))  # at least n_images in all
    ts = syn.make_test_set(domains, classes, per_cell)
    n = len(ts["labels"])
    rng = np.random.default_rng(0)
    difficulty = rng.random(n)

    def correct(seed: int) -> np.ndarray:
        return difficulty + np.random.default_rng(seed).normal(0, 0.05, n) < 0.6

    ca, cb = correct(1), correct(2)
    qd = np.flatnonzero(ts["domains"] == "quickdraw")
    cb[rng.choice(qd, size=int(0.3 * len(qd)), replace=False)] = False
    cell = (ts["domains"] == "sketch") & (ts["labels"] == classes.index("axe"))
    ca[cell], cb[cell] = difficulty[cell] < 0.1, difficulty[cell] < 0.95
    counts = syn.counts_matrix(domains, classes, absent={("sketch", c) for c in heldout})
    runs = [("A", ca, 1), ("B", cb, 2)] + ([("N", correct(3), 3)] if null else [])
    for name, corr, seed in runs:
        arrays = syn.outputs(ts, corr, len(classes), seed, emb_dim=emb_dim)
        syn.write_run(root, name, arrays, classes, heldout, "sketch", counts, seed=seed,
                      recipe_id="cfg" if name != "B" else "cfg-b")
    print(f"synthesised {len(runs)} runs: {n} images, {len(classes)} classes, {emb_dim}-d embeddings")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--emb-dim", type=int, default=1024)
    ap.add_argument("--null", action="store_true", help="also a seed-null run (a third diff pass)")
    ap.add_argument("--keep", type=str, default=None, help="paths.root to keep (default: a temporary directory)")
    ap.add_argument("--generators", type=str, default=None,
                    help="diff.generators, comma-separated (default: the config's, slice_diff,cluster,sae)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="clipgen-diff-bench-") as tmp:
        root = Path(args.keep or tmp)
        t0 = time.time()
        synthesise(root, args.images, args.classes, args.emb_dim, args.null)
        print(f"synthesis: {time.time() - t0:.1f} s (not timed)")
        from clipgen.diff.run import run_diff

        cfg = compose_config([f"paths.root={root}", "logger=none", "run_a=A", "run_b=B"]
                             + (["null_run=N"] if args.null else [])
                             + ([f"diff.generators=[{args.generators}]"] if args.generators else []))
        t0 = time.time()
        res = run_diff(cfg)
        wall = time.time() - t0
    print()
    for g, m in res["generators"].items():
        print(f"  {g}: {m['seconds']:.1f} s ({m['cpu_seconds']:.1f} s CPU), {m['accepted']}/{m['hypotheses']} accepted")
    top = res["top"][:5]
    found_qd = any(h["slice"] == {"domain": "quickdraw"} and h["direction"] == "A" for h in top)
    found_cell = any(h["slice"] == {"domain": "sketch", "class": "axe"} and h["direction"] == "B" for h in top)
    print(f"planted differences among the top 5: quickdraw failure {found_qd}, sketch x axe gain {found_cell}")
    print(f"diff of {res['n_images']} images: {wall:.1f} s (limit {LIMIT_S:.0f} s) -> "
          f"{'PASS' if wall <= LIMIT_S else 'FAIL'}")
    return 0 if wall <= LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
