"""One command for a whole study: world/sources -> recipes -> training grid -> evaluation -> report.

Every stage is idempotent (worlds and recipes are keyed by spec hash, finished runs and evaluated checkpoints are
skipped), so relaunching a study only does what is missing. The per-stage time table printed at the end is
what ``benchmarks/quickstart_timing.py`` reproduces.
"""
from __future__ import annotations

import copy
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from clipgen.errors import ClipgenError
from clipgen.recipes.naming import RECIPE_KINDS, recipe_spec


@dataclass(frozen=True)
class Job:
    test_domain: str
    recipe: str  # study entry: a recipe kind, or "allow:P" / "interpolation:LETTERS"
    seed: int


def parse_recipe_entry(entry: str, test_domain: str) -> dict:
    """Study recipe entries: a kind (``cg_high``), ``allow:0.2`` or ``interpolation:cqrs`` (letters of all
    included domains, as in the paper's lists)."""
    from clipgen.facts import DOMAIN_LETTERS, NATURAL_DOMAIN

    kind, _, arg = str(entry).partition(":")
    if kind not in RECIPE_KINDS:
        raise ClipgenError(f"unknown study.recipes entry {entry!r}: expected one of {', '.join(RECIPE_KINDS)} "
                           "(allow:P and interpolation:LETTERS take an argument)")
    out: dict = {"kind": kind}
    if kind == "allow":
        try:
            out["allow_p"] = float(arg)
        except ValueError:
            raise ClipgenError(f"study.recipes entry {entry!r}: expected allow:P with P a number") from None
    elif kind == "interpolation":
        by_letter = {v: k for k, v in DOMAIN_LETTERS.items()}
        if not arg or any(ch not in by_letter for ch in arg):
            raise ClipgenError(f"study.recipes entry {entry!r}: expected interpolation:LETTERS, e.g. "
                               "interpolation:cqrs")
        out["extra_domains"] = [by_letter[ch] for ch in arg
                                if by_letter[ch] not in (NATURAL_DOMAIN, test_domain)]
    elif arg:
        raise ClipgenError(f"study.recipes entry {entry!r}: kind {kind!r} takes no argument")
    return out


def job_config(cfg: DictConfig, job: Job) -> DictConfig:
    """The config of one training run of the study (what ``clipgen-train`` would get with overrides)."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        for key, value in parse_recipe_entry(job.recipe, job.test_domain).items():
            sub.recipe[key] = value
        sub.recipe.test_domain = job.test_domain
        sub.trainer.seed = job.seed
        if sub.logger.group is None:
            sub.logger.group = cfg.study.name
    recipe_spec(sub.recipe)  # validate before any work starts
    return sub


def study_jobs(cfg: DictConfig) -> list[Job]:
    jobs = [Job(d, r, int(s)) for d in cfg.study.test_domains for r in cfg.study.recipes for s in cfg.study.seeds]
    if not jobs:
        raise ClipgenError("the study has no runs: expected non-empty study.test_domains, study.recipes and "
                           "study.seeds")
    for j in jobs:
        job_config(cfg, j)
    return jobs


def _call(fn_name: str, cfg: DictConfig) -> dict:
    """Run one stage function in a worker process (imported there, so nothing heavy crosses the pipe)."""
    import importlib
    import logging

    if not logging.getLogger().handlers:  # a spawned worker: show the stage's progress lines like Hydra would
        logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("clipgen").setLevel(logging.INFO)
    module, _, name = fn_name.rpartition(".")
    return getattr(importlib.import_module(module), name)(cfg)


def run_many(fn_name: str, cfgs: list[DictConfig], parallel: int) -> list[dict]:
    """Run ``fn_name(cfg)`` for every config, ``parallel`` at a time in fresh processes (in order if 1).
    Every run is independent and seeded by its own config, so the results do not depend on ``parallel``."""
    if parallel <= 1 or len(cfgs) <= 1:
        return [_call(fn_name, c) for c in cfgs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(parallel, len(cfgs)), mp_context=ctx) as pool:
        return list(pool.map(_call, [fn_name] * len(cfgs), cfgs))


def _timed(table: list, stage: str, fn, *args):
    t0 = time.time()
    out = fn(*args)
    table.append((stage, time.time() - t0))
    return out


def format_time_table(rows: list[tuple[str, float]]) -> str:
    total = sum(t for _, t in rows)
    width = max(len(s) for s, _ in rows + [("total", 0)])
    lines = [f"{'stage'.ljust(width)}  seconds", f"{'-' * width}  -------"]
    lines += [f"{s.ljust(width)}  {t:7.1f}" for s, t in rows]
    lines.append(f"{'total'.ljust(width)}  {total:7.1f}")
    return "\n".join(lines)


def run_study(cfg: DictConfig) -> dict:
    from clipgen.recipes.build import build_recipe
    from clipgen.report.build import run_report
    from clipgen.world.generate import run_world

    jobs = study_jobs(cfg)
    times: list[tuple[str, float]] = []
    print(f"study {cfg.study.name}: {len(jobs)} runs "
          f"({len(cfg.study.test_domains)} test domains x {len(cfg.study.recipes)} recipes x "
          f"{len(cfg.study.seeds)} seeds)")
    if cfg.data.source == "world" or cfg.data.base == "world":
        _timed(times, "world", run_world, cfg)

    recipes = {}
    t0 = time.time()
    for job in jobs:
        sub = job_config(cfg, job)
        key = (job.test_domain, job.recipe)
        if key not in recipes:
            recipes[key] = build_recipe(sub)
            print(f"  recipe {recipes[key]['recipe_id']}: {recipes[key]['num_samples']} samples")
    times.append(("recipes", time.time() - t0))

    parallel = int(cfg.study.parallel)
    if parallel < 1:
        raise ClipgenError(f"invalid study.parallel {parallel}: expected 1 or more processes")
    train_cfgs = [job_config(cfg, job) for job in jobs]
    t0 = time.time()
    runs = run_many("clipgen.train.loop.run_train", train_cfgs, parallel)
    times.append((f"train ({len(jobs)} runs, {parallel} at a time)", time.time() - t0))
    for run in runs:
        print(f"  {run['run_dir']}: {run.get('status', '?')}, {run.get('seconds', 0):.0f} s, "
              f"{run.get('samples_per_s') or 0:.0f} samples/s")

    eval_cfgs = []
    for sub, run in zip(train_cfgs, runs):
        sub = copy.deepcopy(sub)
        with open_dict(sub):
            sub.eval.run_dir = run["run_dir"]
        eval_cfgs.append(sub)
    t0 = time.time()
    run_many("clipgen.eval.run.run_eval", eval_cfgs, parallel)
    times.append(("eval", time.time() - t0))
    report = _timed(times, "report", run_report, cfg)

    print()
    print(format_time_table(times))
    print(f"\nreport: {report['report']}")
    return {"runs": [r["run_dir"] for r in runs], "report": report["report"], "times": dict(times),
            "total_seconds": sum(t for _, t in times)}
