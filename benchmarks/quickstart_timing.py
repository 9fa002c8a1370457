"""Reproduce the quick start's per-stage time table (world, recipes, training, evaluation, report).

    python benchmarks/quickstart_timing.py [--root DIR] [extra Hydra overrides ...]

Runs ``experiment=quickstart`` in a fresh temporary paths.root (or --root) exactly as ``clipgen-study`` does and
prints the table and the disk space its outputs take; the acceptance budget is 5 minutes of wall time on 2 CPU
cores and 300 MB.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S, BUDGET_MB = 300, 300


def disk_mb(root: str) -> tuple[float, float]:
    """(allocated, apparent) MB under root: many small images take a whole file-system block each."""
    files = [p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()]
    stats = [p.stat() for p in files]
    return sum(s.st_blocks * 512 for s in stats) / 1e6, sum(s.st_size for s in stats) / 1e6

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="paths.root (default: a fresh temporary directory)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.epochs=8")
    args = ap.parse_args()

    from clipgen.config import compose_config
    from clipgen.launch.study import format_time_table, run_study

    root = args.root or tempfile.mkdtemp(prefix="clipgen-quickstart-")
    cfg = compose_config(["experiment=quickstart", f"paths.root={root}", *args.overrides])
    t0 = time.time()
    out = run_study(cfg)
    wall = time.time() - t0
    print("\n== quick start timing (paths.root = %s, %d cores) ==" % (root, os.cpu_count() or 0))
    print(format_time_table(list(out["times"].items())))
    print(f"wall {wall:.1f} s; budget {BUDGET_S} s -> {'within' if wall <= BUDGET_S else 'OVER'} budget")
    used, apparent = disk_mb(root)
    print(f"disk {used:.0f} MB ({apparent:.0f} MB of file contents); budget {BUDGET_MB} MB -> "
          f"{'within' if used <= BUDGET_MB else 'OVER'} budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
