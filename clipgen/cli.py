"""Console scripts: one thin ``@hydra.main`` per stage over a pure ``run_<stage>(cfg) -> dict``.

All apps share the config tree in clipgen/conf (found through the package, so they work from any directory).
A ClipgenError (bad input) is printed as one line and exits with status 2; Ctrl-C as one line, status 130. In a
``-m`` sweep every job runs whatever the others do, and the sweep ends with a table of jobs and a non-zero exit if
any failed (clipgen.sweep).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

import clipgen
from clipgen import sweep
from clipgen.config import register_configs
from clipgen.errors import ClipgenError
from clipgen.launch import stages

register_configs()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are built from configs
log = logging.getLogger("clipgen")


def _app(run: Callable[[DictConfig], dict], name: str):
    # Not functools.wraps(run): Hydra unwraps __wrapped__ and resolves config_path "conf" against the innermost
    # function's module, and run may live elsewhere (clipgen.launch.stages); main's own module is this one.
    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg: DictConfig) -> dict:
        if sweep.in_multirun():  # one failing job never stops the others (clipgen.sweep)
            return sweep.run_job(run, cfg)
        try:
            return run(cfg)
        except ClipgenError as e:
            print(f"clipgen: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a trainer's step loop (which saves and exits 130 itself)
            print(f"clipgen: interrupted: {name} stopped; finished work is kept, rerun the same command to "
                  "continue", file=sys.stderr)
            sys.exit(130)

    def entry():
        args = sys.argv[1:]
        if "--version" in args:  # Hydra's own --version names Hydra only
            print(f"{name} (clipgen {clipgen.__version__}, Hydra {hydra.__version__})")
            return None
        # Hydra names a job after the calling module (here always "cli"); each app names its own, so sweeps land
        # in {paths.root}/logs/clipgen-<stage>/multirun/<overrides>.
        if not any(a.startswith("hydra.job.name=") for a in args):
            # argparse wants the overrides in one run: put ours before the user's first one, or first of all when
            # there is none (last would be taken as the value of a flag like --info or --cfg).
            first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
            sys.argv.insert(1 + first, f"hydra.job.name={name}")
        return main()

    return entry


def _world(cfg):
    from clipgen.world.generate import run_world
    return run_world(cfg)


def _recipe(cfg):
    from clipgen.recipes.build import run_recipe
    return run_recipe(cfg)


def _export(cfg):
    from clipgen.export.run import run_export
    return run_export(cfg)


def _diff(cfg):
    from clipgen.diff.run import run_diff
    return run_diff(cfg)


def _report(cfg):
    from clipgen.report.build import run_report
    return run_report(cfg)


def _study(cfg):
    from clipgen.launch.study import run_study
    return run_study(cfg)


world_main = _app(_world, "clipgen-world")
recipe_main = _app(_recipe, "clipgen-recipe")
train_main = _app(stages.train_stage, "clipgen-train")
eval_main = _app(stages.eval_stage, "clipgen-eval")
export_main = _app(_export, "clipgen-export")
analyze_main = _app(stages.analyze_stage, "clipgen-analyze")
diff_main = _app(_diff, "clipgen-diff")
report_main = _app(_report, "clipgen-report")
study_main = _app(_study, "clipgen-study")
