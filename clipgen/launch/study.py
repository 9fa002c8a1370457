"""One command for a whole study: world/sources -> recipes -> training grid -> evaluation -> report.

Every stage is idempotent (worlds and recipes are keyed by spec hash, finished runs and evaluated checkpoints are
skipped), so relaunching a study only does what is missing: a run whose training is finished and whose every
checkpoint is evaluated gets no job at all. ``study.dry_run=true`` lists the runs and what each still needs.
``study.launcher=local`` runs the stages here (``study.parallel`` processes, which evaluate each run as soon as
its training ended while the others still train); ``study.launcher=slurm`` submits
one submitit job per run for training (DDP over srun when tasks_per_node > 1), waits, then one per run for
evaluation, and builds the report here. Jobs that time out or are preempted are requeued by submitit (up to
``max_num_timeout``) and resume from ``latest.pt``. The study ends with a status table (done / failed with the
log path) and the per-stage time table that ``benchmarks/quickstart_timing.py`` reproduces.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from clipgen.config import copy_config
from clipgen.errors import ClipgenError
from clipgen.preflight import check_run_config, check_study_grid
from clipgen.launch.stages import analyze_stage, eval_stage, train_stage
from clipgen.procs import orphaned, stage_pool
from clipgen.recipes.grid import run_dir_of, study_runs
from clipgen.recipes.naming import recipe_spec


def settings_conflict(sub: DictConfig, meta: dict) -> str | None:
    """Why an existing run directory cannot be the run this job would launch (None when it is): other training
    or data settings than the name promises (a ``run_name=`` override, or data the name does not spell)."""
    from clipgen import rundir

    diff = rundir.spec_differences(meta["train_spec"], rundir.train_spec(sub)) if "train_spec" in meta else []
    old_data = (meta.get("identity") or {}).get("data")
    if old_data is not None and old_data != rundir.data_spec(sub):
        diff.append("data settings (" + ", ".join(k for k in sorted(set(old_data) | set(rundir.data_spec(sub)))
                                                  if old_data.get(k) != rundir.data_spec(sub).get(k)) + ")")
    return ", ".join(diff) or None


def run_state(sub: DictConfig) -> tuple[str, str]:
    """(training, evaluation) state of one run from its directory: training "finished" | "step N/M" | "not
    started" | "other settings: ..." (the directory holds a run this job must not reuse); evaluation "done"
    (every checkpoint of every task has a result line) | "N/M" | "-"."""
    from clipgen import rundir
    from clipgen.eval.testsets import task_domains, task_name

    run_dir = run_dir_of(sub)
    meta = rundir.read_meta(run_dir)
    if meta is None:
        return "not started", "-"
    conflict = settings_conflict(sub, meta)
    if conflict:
        return f"other settings: {conflict}", "-"
    train = "finished" if meta.get("status") == "finished" else f"step {meta.get('step', 0)}/{meta.get('total_steps')}"
    ckpts = [p.name for _, p in rundir.checkpoints(run_dir)]
    tasks = [task_name(d) for d in task_domains(meta)]
    have = rundir.evaluated(run_dir)
    need = {(t, c) for t in tasks for c in ckpts}
    done = len(need & have)
    evaluation = "done" if need and done == len(need) and train == "finished" else f"{done}/{len(need)}"
    return train, evaluation


def other_settings(sub: DictConfig) -> str:
    """For a run not started yet: the existing runs of the same recipe, model and seed with other settings (so a
    dry run shows that a changed setting makes a new run, never reuses an old one)."""
    from clipgen import rundir

    run_dir = run_dir_of(sub)
    if run_dir.exists():
        return ""
    prefix = f"{recipe_spec(sub.recipe).recipe_id}--{rundir.model_part(sub)}--"
    seed = f"{rundir.SEED_SEP}{sub.trainer.seed}"
    others = sorted(p.name for p in run_dir.parent.glob(f"{prefix}*") if p.name.endswith(seed) and p != run_dir)
    return f"new; other settings exist: {', '.join(others)}" if others else "new"


def format_runs(rows: list[tuple]) -> str:
    head = ("#", "run", "test domain", "training", "evaluation", "note")[:len(rows[0]) if rows else 5]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _call(fn: Callable[[DictConfig], dict], cfg: DictConfig, quiet: bool = False) -> dict:
    """Run one stage function in a worker process (a module-level function travels by reference, its module and
    name, so nothing heavy crosses the pipe). ``quiet``: under the study's progress line, so no progress bar, INFO
    lines or prints (warnings and errors still show)."""
    try:
        return _run_stage(fn, cfg, quiet)
    except SystemExit as e:  # a stop signal: the trainer saved and asks to exit
        if orphaned():  # the study is gone, nobody collects this result: do not wait for more work
            os._exit(e.code if isinstance(e.code, int) else 1)
        raise


def _run_stage(fn: Callable[[DictConfig], dict], cfg: DictConfig, quiet: bool) -> dict:
    import contextlib
    import logging

    if not logging.getLogger().handlers:  # a stage worker: show the stage's progress lines like Hydra would
        logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s] %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("clipgen").setLevel(logging.INFO)
    if not quiet:
        return fn(cfg)
    cfg = copy_config(cfg)
    with open_dict(cfg):
        cfg.trainer.progress_bar = False
    log = logging.getLogger("clipgen")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return fn(cfg)
    finally:
        log.setLevel(level)


def run_pool(workers: int, queues: dict, fns: dict, on_result: Callable, progress) -> None:
    """Run jobs on ``workers`` fresh processes. ``queues``: stage -> deque of (key, cfg), taken in the dict's order
    (an earlier stage's job goes first); ``fns``: stage -> stage function. At most ``workers`` jobs are handed to
    the pool at a time, so after the first error nothing more starts (the running jobs end with the pool, then
    the error is raised). ``on_result(stage, key, cfg, result)`` may queue more jobs; ``progress`` (a
    StudyProgress with a part per stage) counts what runs and is told of each finished job once the next ones
    started."""
    from concurrent.futures import FIRST_COMPLETED, wait

    with stage_pool(workers) as pool:
        running: dict = {}
        ended: list[str] = []
        while True:
            while len(running) < workers and any(queues.values()):
                stage = next(st for st, q in queues.items() if q)
                key, c = queues[stage].popleft()
                running[pool.submit(_call, fns[stage], c, progress.live)] = (stage, key, c)
            for stage in queues:
                progress.set_running(stage, sum(st == stage for st, _, _ in running.values()))
            for stage in ended:  # after the next jobs started, so the line counts what runs now
                progress.finished(stage)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            ended = []
            for f in done:
                stage, key, c = running.pop(f)
                on_result(stage, key, c, f.result())  # an error leaves the loop: nothing more starts
                ended.append(stage)


def run_many(fn: Callable[[DictConfig], dict], cfgs: list[DictConfig], parallel: int, stage: str = "",
             planned: dict | None = None) -> list[dict]:
    """Run ``fn(cfg)`` for every config, ``parallel`` at a time in fresh processes (in order if 1), under
    one study-level progress line (clipgen.launch.progress; ``planned``: its totals per run directory). Every run
    is independent and seeded by its own config, so the results do not depend on ``parallel``. The first error
    stops the study."""
    from collections import deque

    from clipgen.launch.progress import StudyProgress

    if not cfgs:
        return []
    stage = stage or fn.__name__
    workers = min(parallel, len(cfgs))
    progress = StudyProgress(str(cfgs[0].study.name), stage, [run_dir_of(c) for c in cfgs], running=workers,
                             planned=planned)
    out: list = [None] * len(cfgs)
    with progress:
        if workers <= 1:
            for i, c in enumerate(cfgs):
                out[i] = _call(fn, c, progress.live)
                progress.finished()
            return out

        def keep(_stage, i, _cfg, result):
            out[i] = result

        run_pool(workers, {stage: deque(enumerate(cfgs))}, {stage: fn}, keep, progress)
    return out


def train_and_evaluate(train_fn: Callable[[DictConfig], dict], eval_fn: Callable[[DictConfig], dict],
                       to_train: list[DictConfig], to_eval: list[DictConfig],
                       eval_after: Callable[[DictConfig], DictConfig | None], parallel: int,
                       planned: dict | None = None) -> tuple[list[dict], float, int, int]:
    """The local launcher's training and evaluation in one pool of ``parallel`` fresh processes: each run is
    evaluated as soon as its training finished (an evaluation goes before the next training), instead of after
    the slowest run; every evaluation is a function of the checkpoints alone, so the results are those of the
    two stages one after the other. ``to_eval``: runs trained before, evaluated first; ``eval_after(cfg)``: the
    evaluation config of a run trained here, or None. Returns (training results in ``to_train`` order, seconds
    until the last training finished, evaluations run, evaluations finished by then). The first error stops the
    study."""
    from collections import deque

    from clipgen.launch.progress import StudyProgress

    if not to_train and not to_eval:
        return [], 0.0, 0, 0
    t0, results = time.time(), [None] * len(to_train)
    queues = {"eval": deque((None, c) for c in to_eval), "train": deque(enumerate(to_train))}
    progress = StudyProgress(str((to_train or to_eval)[0].study.name), "train", [run_dir_of(c) for c in to_train],
                             running=0, planned=planned)
    progress.add_stage("eval", [run_dir_of(c) for c in to_train + to_eval])
    counts = {"trained": 0, "trained_s": 0.0, "evaluated": 0, "while_training": 0}

    def record(stage, i, cfg, result):
        if stage == "eval":
            counts["evaluated"] += 1
            counts["while_training"] += counts["trained"] < len(to_train)
            return
        results[i] = result
        counts["trained"] += 1
        if counts["trained"] == len(to_train):
            counts["trained_s"] = time.time() - t0
        e = eval_after(cfg)
        if e is not None:
            queues["eval"].append((None, e))
        else:
            progress.not_needed("eval", run_dir_of(cfg))

    with progress:
        run_pool(parallel, queues, {"eval": eval_fn, "train": train_fn}, record, progress)
    return results, counts["trained_s"], counts["evaluated"], counts["while_training"]


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


LAUNCHERS = ("local", "submitit_local", "slurm")


class StageCall:
    """A study stage for one run as a submitit job: ``StageCall(train_stage)(cfg)`` (clipgen.launch.stages). Being
    checkpointable, it is resubmitted with the same config when its job is preempted or times out (submitit
    requeues it up to ``max_num_timeout`` times); the stage then resumes from what is on disk."""

    def __init__(self, fn: Callable[[DictConfig], dict]):
        self.fn = fn

    def __call__(self, cfg: DictConfig) -> dict:
        return _call(self.fn, cfg)

    def checkpoint(self, cfg: DictConfig):
        import submitit

        return submitit.helpers.DelayedSubmission(StageCall(self.fn), cfg)


def slurm_executor(folder: str, stage: str, jc, cluster: str = "slurm"):
    """A submitit executor for one stage from a ``study.slurm.<stage>`` node: SLURM, or submitit's local
    executor (``cluster="local"``: the same jobs as processes on this machine; SLURM-only values are ignored)."""
    import submitit

    ex = submitit.AutoExecutor(folder=f"{folder}/{stage}/%j", cluster=cluster,
                               slurm_max_num_timeout=int(jc.max_num_timeout))
    params = {"name": f"clipgen-{stage}", "timeout_min": int(jc.timeout_min), "nodes": int(jc.nodes),
              "tasks_per_node": int(jc.tasks_per_node), "cpus_per_task": int(jc.cpus_per_task),
              "mem_gb": int(jc.mem_gb), "slurm_signal_delay_s": int(jc.signal_delay_s)}
    if int(jc.gpus_per_node) > 0:
        params["gpus_per_node"] = int(jc.gpus_per_node)
    for key in ("partition", "account", "qos"):
        if jc[key]:
            params[f"slurm_{key}"] = str(jc[key])
    if jc.setup:
        params["slurm_setup"] = list(jc.setup)
    if cluster == "local":  # one process per job here (submitit's local tasks get no SLURM rank variables)
        params.update(tasks_per_node=1, nodes=1)
        params.pop("gpus_per_node", None)
    ex.update_parameters(**params)
    return ex


def run_on_slurm(stage: str, fn: Callable[[DictConfig], dict], cfgs: list[DictConfig], cfg: DictConfig,
                 label: str | None = None) -> list[dict]:
    """Submit one job per config with the resources of ``study.slurm.<stage>``, wait for all; returns per config
    {"job_id", "state", "log", "result"}."""
    if not cfgs:
        return []
    label = label or stage
    cluster = "local" if cfg.study.launcher == "submitit_local" else "slurm"
    ex = slurm_executor(str(cfg.study.slurm.folder), label, cfg.study.slurm[stage], cluster)
    with ex.batch():
        jobs = [ex.submit(StageCall(fn), c) for c in cfgs]
    print(f"  submitted {len(jobs)} {label} jobs: {', '.join(j.job_id for j in jobs)}")
    out = []
    for job in jobs:
        try:
            result, state = job.result(), "done"
        except Exception as e:  # a failed job: its log says why
            result, state = {"error": str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}, \
                "failed"
        out.append({"job_id": job.job_id, "state": state, "log": str(job.paths.stderr), "result": result})
    return out


def run_stage(stage: str, resources: str, fn: Callable[[DictConfig], dict], cfgs: list[DictConfig], cfg: DictConfig,
              failed: dict[str, dict], planned: dict | None = None) -> list[dict]:
    """Run one study stage for every config: here (``study.parallel`` processes under one progress line, its
    totals from ``planned``; returns the results; an error stops the study) or as submitit jobs with the
    resources of ``study.slurm.<resources>`` (failed runs are recorded in ``failed`` under their run name;
    returns the results of the others)."""
    if cfg.study.launcher == "local":
        return run_many(fn, cfgs, int(cfg.study.parallel), stage, planned)
    done = []
    for sub, res in zip(cfgs, run_on_slurm(resources, fn, cfgs, cfg, label=stage)):
        if res["state"] == "done":
            done.append(res["result"])
        else:
            failed[run_dir_of(sub).name] = {"stage": stage, **res}
    return done


def _pointed_at_run(sub: DictConfig, key: str, as_list: bool = False) -> DictConfig:
    """A copy of the run's config with ``key`` (a dotted config key) naming its run directory: what clipgen-eval
    (eval.run_dir) and clipgen-analyze (analysis.run_dirs) are given per run."""
    sub = copy_config(sub)
    run_dir = str(run_dir_of(sub))
    with open_dict(sub):
        OmegaConf.update(sub, key, [run_dir] if as_list else run_dir, merge=False)
    return sub


def _eval_config(sub: DictConfig) -> DictConfig:
    return _pointed_at_run(sub, "eval.run_dir")


def _eval_after(sub: DictConfig) -> DictConfig | None:
    """After training: the run's evaluation config, or None when every checkpoint is already evaluated."""
    return None if run_state(sub)[1] == "done" else _eval_config(sub)


def _planned(subs: list[DictConfig], recipes: dict) -> dict[Path, dict]:
    """Run directory -> its steps and checkpoint evaluations when done, from the built recipes' manifests: the
    progress line's totals, known before any run starts."""
    from clipgen import recipedir
    from clipgen.launch.progress import planned_units

    out = {}
    for sub in subs:
        recipe_dir = Path(recipes[(sub.recipe.test_domain, str(recipe_spec(sub.recipe).recipe_id))]["recipe_dir"])
        out[run_dir_of(sub)] = planned_units(sub, recipedir.read_manifest(recipe_dir))
    return out


def _print_trained(results: list[dict]) -> None:
    for run in results:
        print(f"  {run['run_dir']}: {run.get('status', '?')}, {run.get('seconds', 0):.0f} s, "
              f"{run.get('samples_per_s') or 0:.0f} samples/s")


def run_study(cfg: DictConfig) -> dict:
    """The whole study of the config (module docstring): grid, world and recipes, training and evaluation,
    analyses, the study's report, a status and a time table."""
    launcher = _check_launcher(cfg)
    jobs, subs = map(list, zip(*study_runs(cfg)))
    print(f"study {cfg.study.name}: {len(jobs)} runs "
          f"({len(cfg.study.test_domains)} test domains x {len(cfg.study.recipes)} recipes x "
          f"{len(cfg.study.seeds)} seeds, each run once), launcher {launcher}")
    states = [run_state(sub) for sub in subs]
    if cfg.study.dry_run:
        return _dry_run(subs, jobs, states)
    _refuse_conflicts(subs, states)
    times: list[tuple[str, float]] = []
    failed: dict[str, dict] = {}
    planned = _world_and_recipes(cfg, subs, times)
    to_train, n_eval = _train_and_evaluate(cfg, subs, planned, failed, times)
    if cfg.study.analyze:
        _analyze(cfg, subs, failed, times)
    report = _report(cfg, subs, failed, times)
    _print_end(subs, jobs, failed, times, report)
    if failed:
        raise ClipgenError(f"{len(failed)} of {len(subs)} runs failed (their logs are listed above); relaunch the "
                           "same command to retry them: finished work is skipped")
    return {"runs": [str(run_dir_of(sub)) for sub in subs], "report": report["report"], "times": dict(times),
            "total_seconds": sum(t for _, t in times), "trained": len(to_train), "evaluated": n_eval}


def _check_launcher(cfg: DictConfig) -> str:
    """study.launcher, and one clear line for a bad config before any world, recipe or job."""
    launcher = str(cfg.study.launcher)
    if launcher not in LAUNCHERS:
        raise ClipgenError(f"unknown study.launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    check_run_config(cfg)  # recipe keys are checked per job
    check_study_grid(cfg)
    return launcher


def _dry_run(subs: list[DictConfig], jobs: list, states: list[tuple[str, str]]) -> dict:
    print(format_runs([(i + 1, run_dir_of(sub).name, j.test_domain, *st, other_settings(sub))
                       for i, (sub, j, st) in enumerate(zip(subs, jobs, states))]))
    n_train = sum(st[0] != "finished" for st in states)
    n_eval = sum(st[1] != "done" for st in states)
    print(f"dry run: {n_train} runs to train, {n_eval} to evaluate; nothing was launched")
    return {"runs": [str(run_dir_of(sub)) for sub in subs], "dry_run": True, "to_train": n_train, "to_eval": n_eval}


def _refuse_conflicts(subs: list[DictConfig], states: list[tuple[str, str]]) -> None:
    conflicts = [f"{run_dir_of(sub)} ({st[0]})" for sub, st in zip(subs, states) if st[0].startswith("other settings")]
    if conflicts:
        raise ClipgenError(f"{len(conflicts)} run directories hold runs with other settings than this study would "
                           f"train, so they cannot be reused or resumed: {'; '.join(conflicts)}; expected a "
                           "paths.root for this data (or remove the run_name= override)")


def _world_and_recipes(cfg: DictConfig, subs: list[DictConfig], times: list) -> dict[Path, dict]:
    """The world (when read) and every recipe of the study, built here; the runs' planned units."""
    from clipgen.recipes.build import build_recipe
    from clipgen.world.generate import run_world

    if cfg.data.source == "world" or cfg.data.base == "world":
        _timed(times, "world", run_world, cfg)
    recipes, t0 = {}, time.time()
    for sub in subs:
        key = (sub.recipe.test_domain, str(recipe_spec(sub.recipe).recipe_id))
        if key not in recipes:
            recipes[key] = build_recipe(sub)
            print(f"  recipe {recipes[key]['recipe_id']}: {recipes[key]['num_samples']} samples")
    times.append(("recipes", time.time() - t0))
    return _planned(subs, recipes)


def _train_and_evaluate(cfg: DictConfig, subs: list[DictConfig], planned: dict, failed: dict,
                        times: list) -> tuple[list[DictConfig], int]:
    """Train what is not finished and evaluate what is not done: one pool that evaluates each run as soon as it
    is trained (local, parallel > 1), else the two stages one after the other. (runs trained, runs evaluated)."""
    launcher, parallel = str(cfg.study.launcher), int(cfg.study.parallel)
    now = [(sub, run_state(sub)) for sub in subs]
    to_train = [sub for sub, (train, _) in now if train != "finished"]
    where = f"{launcher} jobs" if launcher != "local" else f"{parallel} at a time"
    t0 = time.time()
    if launcher == "local" and parallel > 1:
        before = [_eval_config(sub) for sub, (train, ev) in now if train == "finished" and ev != "done"]
        trained, t_trained, n_eval, overlapped = train_and_evaluate(train_stage, eval_stage, to_train, before,
                                                                    _eval_after, parallel, planned)
        _print_trained(trained)
        times.append((f"train ({len(to_train)} of {len(subs)} runs, {where})", t_trained))
        times.append((f"eval ({n_eval} runs" + (f", {overlapped} while training" if overlapped else "") + ")",
                      time.time() - t0 - t_trained))
        return to_train, n_eval
    _print_trained(run_stage("train", "train", train_stage, to_train, cfg, failed, planned))
    times.append((f"train ({len(to_train)} of {len(subs)} runs, {where})", time.time() - t0))
    to_eval = [_eval_config(sub) for sub in subs if run_dir_of(sub).name not in failed and run_state(sub)[1] != "done"]
    t0 = time.time()
    run_stage("eval", "eval", eval_stage, to_eval, cfg, failed, planned)
    times.append((f"eval ({len(to_eval)} runs)", time.time() - t0))
    return to_train, len(to_eval)


def _analyze(cfg: DictConfig, subs: list[DictConfig], failed: dict, times: list) -> None:
    """clipgen-analyze on every run (study.analyze; analyses that are current are skipped)."""
    from clipgen.analyze.run import pending_analyses

    to_analyze = [_pointed_at_run(sub, "analysis.run_dirs", as_list=True) for sub in subs
                  if run_dir_of(sub).name not in failed and pending_analyses(sub, run_dir_of(sub))]
    t0 = time.time()
    run_stage("analyze", "eval", analyze_stage, to_analyze, cfg, failed)
    times.append((f"analyze ({len(to_analyze)} runs)", time.time() - t0))


def _report(cfg: DictConfig, subs: list[DictConfig], failed: dict, times: list) -> dict:
    """The study's own report (its runs only) in reports/{study}; clipgen-report still aggregates every run."""
    from clipgen import layout
    from clipgen.report.build import run_report

    rcfg = copy_config(cfg)
    with open_dict(rcfg):
        rcfg.logger.group = cfg.logger.group or cfg.study.name
    runs = [run_dir_of(sub) for sub in subs if run_dir_of(sub).name not in failed]
    return _timed(times, "report", run_report, rcfg, runs, layout.study_report_dir(cfg), cfg.study.name)


def _print_end(subs: list[DictConfig], jobs: list, failed: dict, times: list, report: dict) -> None:
    """The status table of every run (failures with their logs), the time table and the report's path."""
    rows = []
    for i, (sub, job) in enumerate(zip(subs, jobs)):
        name = run_dir_of(sub).name
        train, evaluation = run_state(sub)
        if name in failed:
            f = failed[name]
            evaluation = f"FAILED in {f['stage']} (job {f['job_id']}): {f['log']}"
        rows.append((i + 1, name, job.test_domain, train, evaluation))
    print()
    print(format_runs(rows))
    print()
    print(format_time_table(times))
    print(f"\nreport: {report['report']}")
