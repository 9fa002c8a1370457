"""The per-run stages, each importing its stage module when called: what the console scripts (clipgen.cli) run,
and what a study hands to a stage process or a submitit job by reference. Importing this module imports no stage,
so neither a console script's start nor the study process pays for torch before a stage runs (a study relaunch
with nothing to do takes ~2.6 CPU s instead of ~4.6: benchmarks/study_overhead.py)."""
from __future__ import annotations

from omegaconf import DictConfig


def train_stage(cfg: DictConfig) -> dict:
    from clipgen.train.loop import run_train

    return run_train(cfg)


def eval_stage(cfg: DictConfig) -> dict:
    from clipgen.eval.run import run_eval

    return run_eval(cfg)


def analyze_stage(cfg: DictConfig) -> dict:
    from clipgen.analyze.run import run_analyze

    return run_analyze(cfg)
