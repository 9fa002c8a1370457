"""One study-level progress line while a stage runs over many runs on this machine.

Parallel training processes that each draw their own tqdm bar on the same terminal overwrite each other. On a
terminal the study therefore draws a single line instead, redrawn in place about once a second::

    study quickstart · train: 3/15 runs done, 2 running · 4200/~22500 steps (19%) · 2:13

and runs its stages quietly (no per-run bar, no per-run INFO lines or prints; warnings and errors still show, and
every result is on disk). Training steps are read from each run's meta.json, which training rewrites at every
``trainer.save_every_steps`` and epoch end; evaluation counts the lines of each run's results.jsonl against its
checkpoints x tasks. The totals are known before any run starts (:func:`planned_units`, from each run's config and
its recipe's manifest), so the line shows them from its first second, and a total never shrinks, so the
percentage only grows. Without a terminal (batch jobs, pipes, CI) nothing is redrawn: the stages log as usual and
the study adds one plain line when a stage starts and each time a run finishes.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from clipgen import rundir


def _train_units(run_dir: Path) -> tuple[int, int] | None:
    """(steps done, total steps) of a run from its meta.json; None before training wrote it."""
    try:
        meta = json.loads(rundir.meta_path(run_dir).read_text(encoding="utf-8"))
        step, total = int(meta.get("step") or 0), int(meta["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not started yet, or meta.json is being replaced right now: the next tick reads it
    return min(step, total), total


def _eval_units(run_dir: Path) -> tuple[int, int] | None:
    """(result lines written, checkpoints x tasks) of a run; None before it has checkpoints."""
    from clipgen.eval.testsets import task_domains

    try:
        meta = json.loads(rundir.meta_path(run_dir).read_text(encoding="utf-8"))
        total = len(rundir.checkpoints(run_dir)) * len(task_domains(meta))
        path = rundir.results_path(run_dir)
        lines = sum(1 for line in path.open("rb") if line.strip()) if path.exists() else 0
    except (OSError, ValueError, KeyError):
        return None
    return (min(lines, total), total) if total else None


# What a stage's progress is counted in, and how to read it from a run directory.
UNITS = {"train": ("steps", _train_units), "eval": ("checkpoint evaluations", _eval_units)}


def planned_units(sub, manifest: dict) -> dict[str, int]:
    """What a run of config ``sub`` on the recipe of ``manifest`` counts when it is done, known before it starts:
    ``train``, its steps (epochs x full batches of recipe + base corpus, clipgen.train.data's epoch), and
    ``eval``, its checkpoint evaluations (saved epochs x tasks)."""
    from clipgen.eval.testsets import task_domains

    n = int(manifest["num_samples"]) + int((manifest.get("base") or {}).get("num_samples") or 0)
    epochs, tc = int(sub.trainer.epochs), sub.trainer
    tasks = len(task_domains({"recipe_kind": manifest.get("kind"), "test_domain": manifest.get("test_domain")}))
    tasks += bool(sub.eval.get("imagenet_val_root")) and str(tc.objective) == "clip"  # imagenet-val
    return {"train": epochs * (n // int(tc.batch_size)),
            "eval": len(rundir.saved_epochs(epochs, int(tc.save_every_epochs))) * tasks}


def units(stage: str, run_dirs: list[Path], planned: dict[Path, int] | None = None) -> tuple[int, int, bool] | None:
    """(done, total, estimated) over the runs. A run's total is what its files say (training: meta.json's steps;
    evaluation: at least its checkpoints so far x tasks), else its planned total; without one, runs that have not
    started count as the started ones' mean (``estimated``). None for a stage without units, or when no run has
    started and nothing is planned."""
    if stage not in UNITS:
        return None
    planned = planned or {}
    read = UNITS[stage][1]
    done = total = 0
    unknown = 0
    for d in map(Path, run_dirs):
        u, plan = read(d), planned.get(d)
        if u is None and plan is None:
            unknown += 1
            continue
        run_done, run_total = u or (0, 0)
        run_total = run_total if plan is None or (stage == "train" and u is not None) else max(run_total, plan)
        done, total = done + min(run_done, run_total), total + run_total
    if unknown == len(run_dirs):
        return None
    if unknown:
        total = round(total * len(run_dirs) / (len(run_dirs) - unknown))
    return done, total, bool(unknown)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Part:
    """One stage on the line: its runs, how many are done and how many are running now, the planned units per
    run and the largest total shown so far (a total on the line never shrinks)."""

    stage: str
    run_dirs: list[Path]
    running: int = 0
    done: int = 0
    planned: dict[Path, int] | None = None
    shown_total: int = 0

    def text(self) -> list[str]:
        n = len(self.run_dirs)
        running = min(self.running, n - self.done)
        head = f"{self.stage}: {self.done}/{n} runs done" + (f", {running} running" if running > 0 else "")
        counted = units(self.stage, self.run_dirs, self.planned)
        if counted is None:
            return [head]
        done, total, estimated = counted
        self.shown_total = max(self.shown_total, total)
        total = self.shown_total
        return [head, f"{done}/{'~' if estimated else ''}{total} {UNITS[self.stage][0]} "
                      f"({100 * done / max(total, 1):.0f}%)"]


class StudyProgress:
    """``with StudyProgress(study, stage, run_dirs) as p: ... p.finished()`` once per finished run.
    ``p.live`` says whether it draws in place (the stages should then run quietly). A second stage that runs at
    the same time (the local launcher evaluates runs while others still train) is added with ``add_stage`` and
    shown after the first; ``set_running`` and ``finished(stage)`` then say which stage they count."""

    def __init__(self, study: str, stage: str, run_dirs: list[Path], running: int = 1,
                 stream: TextIO | None = None, interval: float = 1.0, planned: dict[Path, dict] | None = None):
        """``planned``: run directory -> :func:`planned_units` of the run, for totals known from the start."""
        self.study, self.stage, self.planned = study, stage, planned or {}
        self.parts = {stage: self._part(stage, run_dirs, min(running, len(run_dirs)))}
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.t0 = interval, time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _part(self, stage: str, run_dirs: list[Path], running: int = 0) -> _Part:
        dirs = [Path(d) for d in run_dirs]
        planned = {d: self.planned[d][stage] for d in dirs if stage in self.planned.get(d, {})}
        return _Part(stage, dirs, running, planned=planned)

    def add_stage(self, stage: str, run_dirs: list[Path]) -> None:
        self.parts[stage] = self._part(stage, run_dirs)

    def set_running(self, stage: str, running: int) -> None:
        self.parts[stage].running = running

    def not_needed(self, stage: str, run_dir: Path) -> None:
        """A run the stage turned out to have nothing to do for leaves its count (and its units the total)."""
        part = self.parts[stage]
        part.run_dirs.remove(Path(run_dir))
        part.shown_total = max(0, part.shown_total - (part.planned or {}).get(Path(run_dir), 0))

    def line(self) -> str:
        parts = [f"study {self.study}"]
        for part in self.parts.values():
            if part.run_dirs:
                parts += part.text()
        parts.append(_clock(time.time() - self.t0))
        return " · ".join(parts)

    def _draw(self, end: str = "") -> None:
        with self._lock:
            self.stream.write("\r\033[K" + self.line() + end)  # \033[K: clear what a longer line left
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def finished(self, stage: str | None = None) -> None:
        """One run of the stage (the first one unless named) is done."""
        self.parts[stage or self.stage].done += 1
        if self.live:
            self._draw()
        else:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "StudyProgress":
        if not any(part.run_dirs for part in self.parts.values()):
            return self
        if not self.live:  # a log from the first second: what the stage will count
            print(self.line(), file=self.stream, flush=True)
            return self
        self._draw()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._draw(end="\n")  # the final state stays on screen
