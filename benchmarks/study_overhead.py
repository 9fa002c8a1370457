"""A study's fixed costs beside another checkout of clipgen: composing a config, planning a study, and the stage
processes of a local study.

    python benchmarks/study_overhead.py --baseline DIR [--repeats 5]

DIR is a checkout to compare with (``git worktree add /tmp/base <commit>``). Every measurement runs in a fresh
process whose PYTHONPATH puts the checkout under test first, new and baseline alternating, and the median of
``--repeats`` is reported:

- compose: CPU seconds per composition of ``experiment=paper_grid`` (20 in one process, after a first one);
- plan: CPU seconds of ``clipgen-study experiment=world_domains study.dry_run=true`` in-process after imports
  (compose, the 105 runs and their configs, each run's state);
- study: wall seconds of ``clipgen-study debug=smoke study.parallel=2`` with four runs (training, then evaluation
  in the same pool of two stage processes), on a world generated beforehand and a fresh runs directory;
- relaunch: CPU seconds of the same command again, with nothing left to do (the whole process: imports,
  planning, each run's state, the report).

Prints each figure for both checkouts and the ratio baseline / new (above 1: the new checkout is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

COMPOSE = """
import json, time
from clipgen.config import compose_config
compose_config(["experiment=paper_grid"])
t = time.process_time()
for _ in range(20):
    compose_config(["experiment=paper_grid"])
print(json.dumps((time.process_time() - t) / 20))
"""

PLAN = """
import contextlib, io, json, sys, time
from clipgen.config import compose_config
from clipgen.launch.study import run_study
t = time.process_time()
with contextlib.redirect_stdout(io.StringIO()):
    run_study(compose_config(["experiment=world_domains", "study.dry_run=true", f"paths.root={sys.argv[1]}"]))
print(json.dumps(time.process_time() - t))
"""

STUDY = "import sys; from clipgen.cli import study_main; sys.argv[0] = 'clipgen-study'; study_main()"
STUDY_ARGS = ["debug=smoke", "study.name=overhead", "study.recipes=[cg_high,lod]", "study.seeds=[0,1]",
              "study.parallel=2"]


def _env(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _python(checkout: Path, code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], env=_env(checkout), capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _study(checkout: Path, root: Path) -> float:
    shutil.rmtree(root / "runs", ignore_errors=True)
    shutil.rmtree(root / "reports", ignore_errors=True)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", STUDY, f"paths.root={root}", *STUDY_ARGS], env=_env(checkout),
                         capture_output=True, text=True, cwd=root)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    return time.perf_counter() - t


def _relaunch(checkout: Path, root: Path) -> float:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", STUDY, f"paths.root={root}", *STUDY_ARGS], env=_env(checkout),
                         capture_output=True, text=True, cwd=root)
    if out.returncode or "train (0 of 4 runs" not in out.stdout:
        raise SystemExit(f"{checkout}: the relaunch had work to do or failed: {(out.stdout + out.stderr)[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="the checkout to compare with")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each measurement on each side (default 5)")
    args = ap.parse_args()
    sides = {"new": HERE, "baseline": args.baseline.resolve()}
    if not (sides["baseline"] / "clipgen" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: expected a checkout of clipgen (no clipgen/__init__.py)")

    with tempfile.TemporaryDirectory(prefix="clipgen-overhead-") as tmp:
        roots = {side: Path(tmp) / side for side in sides}
        for side, checkout in sides.items():  # the world and recipes each study reads, made once per side
            roots[side].mkdir()
            _study(checkout, roots[side])
        figures = {name: {side: [] for side in sides} for name in ("compose", "plan", "study", "relaunch")}
        for _ in range(args.repeats):
            for side, checkout in sides.items():
                figures["compose"][side].append(_python(checkout, COMPOSE))
                figures["plan"][side].append(_python(checkout, PLAN, str(Path(tmp) / "plan")))
                figures["study"][side].append(_study(checkout, roots[side]))
                figures["relaunch"][side].append(_relaunch(checkout, roots[side]))

    units = {"compose": "CPU s per composition", "plan": "CPU s, 105-run dry run", "study": "wall s, 4 runs",
             "relaunch": "CPU s, 4 runs done"}
    print(f"{'figure':<8} {'new':>9} {'baseline':>9} {'baseline/new':>13}  (median of {args.repeats}; load "
          f"{os.getloadavg()[0]:.1f})")
    for name, by_side in figures.items():
        new, base = statistics.median(by_side["new"]), statistics.median(by_side["baseline"])
        print(f"{name:<8} {new:9.3f} {base:9.3f} {base / new:12.2f}x  {units[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
