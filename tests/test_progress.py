"""The study's single progress line: drawn in place on a terminal with the steps read from the runs' meta.json,
plain lines elsewhere, and the stages under it run quietly (no per-run bar, no prints) with the same results."""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from clipgen.launch.progress import StudyProgress, units
from clipgen.launch.study import run_many
from clipgen.recipes.grid import run_dir_of

from conftest import make_cfg


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stage(cfg) -> dict:
    """A stage as run_many calls it: it prints and logs like train/eval do and says how it was configured. Seed 3
    takes a second, so that two runs started together do not end together (each end is its own progress line)."""
    if int(cfg.trainer.seed) == 3:
        time.sleep(1.0)
    print("per-run table that must not reach a terminal under the study line")
    logging.getLogger("clipgen").info("per-run INFO line")
    return {"seed": int(cfg.trainer.seed), "bar": bool(cfg.trainer.progress_bar)}


def _cfgs(tmp_path, seeds):
    return [make_cfg(tmp_path, "debug=smoke", "study.name=demo", f"trainer.seed={s}") for s in seeds]


def test_line_counts_runs_and_steps_from_meta(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for d, step in zip(dirs[:2], (30, 100)):
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"step": step, "total_steps": 100}))
    term = _Terminal()
    with StudyProgress("demo", "train", dirs, running=2, stream=term, interval=60) as p:
        assert p.live
        p.finished()
    text = term.getvalue()
    assert "\r" in text and text.endswith("\n") and text.count("\n") == 1  # redrawn in place, one line left
    last = text.rsplit("\r", 1)[-1]
    # c has not started: it counts as the mean of a and b, and the total is marked as an estimate
    assert last.startswith("\033[Kstudy demo · train: 1/3 runs done, 2 running · 130/~300 steps (43%) · 0:0")
    (dirs[2] / "checkpoints").mkdir(parents=True)
    (dirs[2] / "meta.json").write_text(json.dumps({"step": 100, "total_steps": 100, "recipe_kind": "cg_low",
                                                   "test_domain": "sketch"}))
    for e in range(3):
        (dirs[2] / "checkpoints" / f"epoch_{e:03d}.pt").touch()
    (dirs[2] / "eval").mkdir()
    (dirs[2] / "eval" / "results.jsonl").write_text("{}\n{}\n")
    assert units("eval", dirs[2:]) == (2, 3, False)
    assert units("train", dirs) == (230, 300, False) and units("analyze", dirs) is None
    plain = io.StringIO()
    with StudyProgress("demo", "eval", dirs, stream=plain) as p:
        assert not p.live
        p.finished()
        p.finished()
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("study demo · eval: 0/3 runs done, 1 running · 2/~9 ")  # a line as the stage starts
    assert lines[-1].startswith("study demo · eval: 2/3 runs done, 1 running · 2/~9 ")
    assert "\r" not in plain.getvalue()


def test_planned_totals_show_from_the_start_and_never_shrink(tmp_path):
    """The totals a study knows before its runs start (steps from the recipe's size, evaluations from the saved
    epochs x tasks): before, the line showed nothing until a run wrote meta.json, then estimated the others from
    the started ones and jumped (20/~60 (33%), 20/~33 (61%), 24/27 (89%))."""
    from clipgen.launch.progress import planned_units

    cfg = make_cfg(tmp_path, "debug=smoke", "trainer.epochs=5", "trainer.save_every_epochs=2",
                   "trainer.batch_size=32")
    manifest = {"num_samples": 100, "base": {"num_samples": 40}, "kind": "cg_low", "test_domain": "sketch"}
    # 140 // 32 = 4 steps a epoch; checkpoints of epochs 0, 2, 4, 5; a natural-only run has all five test domains
    assert planned_units(cfg, manifest) == {"train": 20, "eval": 4}
    assert planned_units(cfg, {**manifest, "kind": "natural_only"})["eval"] == 4 * 5
    dirs = [tmp_path / "a", tmp_path / "b"]
    planned = {dirs[0]: {"train": 20, "eval": 4}, dirs[1]: {"train": 60, "eval": 20}}
    plain = io.StringIO()
    with StudyProgress("demo", "train", dirs, running=2, stream=plain, planned=planned) as p:
        dirs[0].mkdir()
        (dirs[0] / "meta.json").write_text(json.dumps({"step": 20, "total_steps": 20}))
        p.finished()
        dirs[1].mkdir()  # skipped bad samples: fewer steps than planned; the total shown stays
        (dirs[1] / "meta.json").write_text(json.dumps({"step": 10, "total_steps": 50}))
        p.finished()
    counts = [line.split(" · ")[2] for line in plain.getvalue().splitlines()]
    assert counts == ["0/80 steps (0%)", "20/80 steps (25%)", "30/80 steps (38%)"]


def test_stages_under_the_line_run_quietly_with_the_same_results(tmp_path, monkeypatch, capsys):
    cfgs = _cfgs(tmp_path, (0, 1))
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    level = logging.getLogger("clipgen").level
    out = run_many(_stage, cfgs, 1, "train")
    assert out == [{"seed": 0, "bar": False}, {"seed": 1, "bar": False}]
    assert "per-run" not in capsys.readouterr().out
    assert term.getvalue().rsplit("\r", 1)[-1].startswith("\033[Kstudy demo · train: 2/2 runs done · ")
    assert logging.getLogger("clipgen").level == level  # quiet only while the stage runs
    assert cfgs[0].trainer.progress_bar  # the caller's config is untouched


def test_parallel_workers_without_terminal_keep_their_output(tmp_path, capfd):
    cfgs = _cfgs(tmp_path, (2, 3, 4))
    out = run_many(_stage, cfgs, 2, "eval")
    assert out == [{"seed": s, "bar": True} for s in (2, 3, 4)]  # in config order whatever finished first
    captured = capfd.readouterr()
    assert captured.out.count("per-run table") == 3
    lines = [x for x in captured.err.splitlines() if x.startswith("study demo")]
    assert [x.split(" · ")[1] for x in lines] == ["eval: 0/3 runs done, 2 running", "eval: 1/3 runs done, 2 running",
                                                  "eval: 2/3 runs done, 1 running", "eval: 3/3 runs done"]
    assert run_dir_of(cfgs[0]) != run_dir_of(cfgs[1])


def _train_marking(cfg) -> dict:
    """A training stage for train_and_evaluate: seed 0 takes longer than the rest; each writes when it ended."""
    time.sleep(4.0 if int(cfg.trainer.seed) == 0 else 0.3)
    (Path(cfg.paths.root) / f"trained-{cfg.trainer.seed}").write_text(repr(time.time()))
    return {"seed": int(cfg.trainer.seed)}


def _eval_marking(cfg) -> dict:
    (Path(cfg.paths.root) / f"evaluated-{cfg.trainer.seed}").write_text(repr(time.time()))
    return {"evaluated": int(cfg.trainer.seed)}


def test_local_study_evaluates_runs_while_others_still_train(tmp_path, capfd):
    """study.launcher=local with parallel > 1: a run is evaluated as soon as its training ended (before the next
    training starts), not after the slowest run; runs trained before are evaluated first."""
    from clipgen.launch.study import train_and_evaluate

    cfgs = _cfgs(tmp_path, (0, 1, 2))
    before = _cfgs(tmp_path, (7,))
    results, t_trained, n_eval, overlapped = train_and_evaluate(
        _train_marking, _eval_marking, cfgs, before, lambda c: None if int(c.trainer.seed) == 2 else c, 2)
    assert results == [{"seed": 0}, {"seed": 1}, {"seed": 2}]  # in config order
    stamp = {p.name: float(p.read_text()) for p in tmp_path.glob("*ed-*")}
    assert sorted(stamp) == ["evaluated-0", "evaluated-1", "evaluated-7", "trained-0", "trained-1", "trained-2"]
    assert stamp["evaluated-1"] < stamp["trained-0"] and stamp["evaluated-7"] < stamp["trained-0"]
    assert stamp["evaluated-0"] > stamp["trained-0"]
    assert stamp["evaluated-1"] < stamp["trained-2"]  # an evaluation goes before the next training
    assert n_eval == 3 and overlapped == 2 and t_trained >= 4.0
    lines = [x.split(" · ")[1:3] for x in capfd.readouterr().err.splitlines() if x.startswith("study demo")]
    assert lines == [  # what runs after each event; seed 2 needs no evaluation, so eval's total drops to 3
        ["train: 0/3 runs done", "eval: 0/4 runs done"],  # as the stage starts
        ["train: 0/3 runs done, 2 running", "eval: 1/4 runs done"],
        ["train: 1/3 runs done, 1 running", "eval: 1/4 runs done, 1 running"],
        ["train: 1/3 runs done, 2 running", "eval: 2/4 runs done"],
        ["train: 2/3 runs done, 1 running", "eval: 2/3 runs done"],
        ["train: 3/3 runs done", "eval: 2/3 runs done, 1 running"],
        ["train: 3/3 runs done", "eval: 3/3 runs done"]]


def _fails_for_seed_0(cfg) -> dict:
    if int(cfg.trainer.seed) == 0:
        raise ValueError("seed 0 cannot train")
    time.sleep(1.0)
    (Path(cfg.paths.root) / f"ran-{cfg.trainer.seed}").write_text("")
    return {}


def test_first_error_of_a_local_stage_stops_the_queue(tmp_path):
    """The first error stops the study: runs still queued are not started (before, every queued run of the stage
    trained to the end before the error was shown)."""
    import pytest

    cfgs = _cfgs(tmp_path, (0, 1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="seed 0 cannot train"):
        run_many(_fails_for_seed_0, cfgs, 2, "train")
    ran = sorted(p.name for p in tmp_path.glob("ran-*"))
    assert "ran-1" in ran and "ran-5" not in ran and len(ran) < 5, ran


def _whereabouts(cfg) -> dict:
    """A stage that reports the process it runs in: its environment, directory, output, and what it imported."""
    import os
    import sys

    print(f"stage worker {cfg.trainer.seed} writes here")
    return {"mark": os.environ.get("CLIPGEN_TEST_MARK"), "cwd": os.getcwd(), "pid": os.getpid(),
            "preloaded": "open_clip" in sys.modules and "clipgen.train.loop" in sys.modules}


def test_stage_workers_take_the_study_environment_directory_and_output_as_they_are_now(tmp_path, monkeypatch, capfd):
    """A study's stage processes are forked from the fork server, which imported torch, open_clip and the stages
    once (no import of their own), and which may have started long before: each takes over the study's
    environment, working directory and stdout as they are when its pool starts, as a spawned process would."""
    import os

    cfgs = _cfgs(tmp_path, (2, 3))
    first = run_many(_whereabouts, cfgs, 2, "eval")  # the fork server runs from here on, with this environment
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.setenv("CLIPGEN_TEST_MARK", "set after the server started")
    monkeypatch.chdir(here)
    capfd.readouterr()
    out = run_many(_whereabouts, cfgs, 2, "eval")
    assert [(o["mark"], o["cwd"], o["preloaded"]) for o in out] == [("set after the server started", str(here),
                                                                     True)] * 2
    assert {o["pid"] for o in out}.isdisjoint({os.getpid()} | {o["pid"] for o in first})  # fresh processes
    captured = capfd.readouterr().out
    assert "stage worker 2 writes here" in captured and "stage worker 3 writes here" in captured
