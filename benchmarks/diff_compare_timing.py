"""CPU time of the diffing paper's methods comparison on a trained study's runs.

    python benchmarks/diff_compare_timing.py [--study-root /work/studyroot] [--keep DIR] [overrides ...]
    (default overrides: experiment=world_study diff=design_contrasts)

Runs ``clipgen-diff <overrides>`` (the comparison: every contrast at every seed, plus the seed-null pairs) in a
fresh temporary paths.root whose ``runs/`` and ``recipes/`` are symbolic links to the study root's, so every pair
is diffed from scratch and nothing is written into the study root. Prints the wall time, the CPU time of this
process (``resource.getrusage``, all threads; the machine may be shared, so CPU seconds are the number to compare),
and each generator's CPU seconds summed over the pairs: the SAE generator's beside the baseline of the two
generators clipgen-diff had before it (slice_diff + cluster), and the rest (loading, verification of the seed
pairs, plots, files); importing torch (the SAE generator's only heavy import) is done and timed before, once.
The study must have been trained and evaluated (``clipgen-study experiment=world_study``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds  # noqa: E402  (sets the offline environment first)


def warm_torch() -> None:
    """Import torch and build one Adam (which imports torch's compiler stack) before timing: a one-time cost of
    the process, reported on its own line, not charged to the first pair's SAE generator."""
    import torch

    from clipgen.diff.generators import sae  # noqa: F401

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-root", default="/work/studyroot", help="paths.root of the trained study")
    ap.add_argument("--keep", default=None, help="write the diffs here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", default=["experiment=world_study", "diff=design_contrasts"])
    args = ap.parse_args()
    study = Path(args.study_root).resolve()
    for sub in ("runs", "recipes"):
        if not (study / sub).is_dir():
            print(f"{study / sub} does not exist: expected a trained study's paths.root", file=sys.stderr)
            return 2

    from clipgen.config import compose_config
    from clipgen.diff.run import run_diff

    c0 = cpu_seconds()
    warm_torch()
    once = cpu_seconds() - c0

    with tempfile.TemporaryDirectory(prefix="clipgen-compare-bench-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("runs", "recipes"):
            if not (root / sub).exists():
                os.symlink(study / sub, root / sub)
        cfg = compose_config([f"paths.root={root}", "logger=none", *args.overrides])
        t0, c0 = time.time(), cpu_seconds()
        res = run_diff(cfg)
        wall, cpu = time.time() - t0, cpu_seconds() - c0
    per_gen: dict[str, float] = {}
    for row in res["pairs"]:
        for g, m in row["generators"].items():
            per_gen[g] = per_gen.get(g, 0.0) + float(m.get("cpu_seconds") or 0.0)
    n = len(res["pairs"])
    print()
    print(f"comparison of {n} pairs ({sum(r['kind'] == 'null' for r in res['pairs'])} seed-null), "
          f"{res['computed_pairs']} diffed now: {wall:.1f} s wall, {cpu:.1f} s CPU ({cpu / max(n, 1):.2f} s per pair)")
    for g, s in per_gen.items():
        print(f"  {g:<11} {s:7.1f} s CPU over the pairs ({s / max(n, 1):.2f} s per pair)")
    base = per_gen.get("slice_diff", 0.0) + per_gen.get("cluster", 0.0)
    if "sae" in per_gen and base > 0:
        print(f"  sae vs the baseline slice_diff + cluster: {per_gen['sae']:.1f} vs {base:.1f} s CPU "
              f"({per_gen['sae'] / base:.2f}x)")
    print(f"  everything else (loading, seed-pair checks, plots, files): {cpu - sum(per_gen.values()):.1f} s CPU")
    print(f"  before the timing, once per process: importing torch for the SAE generator, {once:.1f} s CPU")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
