"""Hydra ``-m`` sweeps that run every job: a failing job is recorded, the others go on, and the sweep ends with a
table of its jobs (done / failed with the log to read) and exit status 1 if any failed.

Hydra's basic launcher stops a sweep at the first job that raises (and ``sys.exit`` stops it at once). In a sweep
each clipgen app therefore runs its stage through :func:`run_job`, which catches the failure, writes the traceback
to ``{job dir}/error.log`` and the job's status to ``{job dir}/clipgen-job.json``, and returns. The
:class:`SweepTable` callback (``hydra.callbacks`` in conf/config.yaml) reads those files when the sweep ends,
on any launcher (jobs of the submitit launchers write them on the shared file system). A stop signal (exit
status 128 + n: the trainer saved ``latest.pt``) still ends the sweep, as the user or the scheduler asked.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from clipgen.errors import ClipgenError

STATUS_FILE = "clipgen-job.json"


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _log_path(job_dir: Path) -> str:
    """Where a failed job's full output is: submitit's stderr file in a submitit job, else our error.log."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            import submitit

            return str(submitit.JobEnvironment().paths.stderr)
        except Exception:  # not inside a submitit job after all
            pass
    return str(job_dir / "error.log")


def run_job(run: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Run one sweep job, recording its outcome instead of letting a failure end the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from clipgen.files import atomic_write_json, atomic_write_text

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    status = {"num": int(hc.job.num), "job": hc.job.override_dirname or f"job {hc.job.num}",
              "started": time.time()}
    try:
        out = run(cfg)
    except SystemExit as e:
        if isinstance(e.code, int) and e.code >= 128:  # a stop signal: the sweep stops too
            raise
        error, code = f"exited with status {e.code}", e.code
    except ClipgenError as e:
        print(f"clipgen: error: {e}", file=sys.stderr)
        error, code = str(e), 2
        atomic_write_text(job_dir / "error.log", f"clipgen: error: {e}\n")
    except Exception as e:  # noqa: BLE001 - any failure of one job is that job's, not the sweep's
        traceback.print_exc()
        error, code = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1
        atomic_write_text(job_dir / "error.log", traceback.format_exc())
    else:
        atomic_write_json(job_dir / STATUS_FILE, {**status, "status": "done", "finished": time.time()})
        return out
    atomic_write_json(job_dir / STATUS_FILE, {**status, "status": "failed", "error": error, "exit_code": code,
                                             "log": _log_path(job_dir), "finished": time.time()})
    return {"failed": True, "error": error}


def read_statuses(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    """The status of every job of a sweep that finished at or after ``since``, in job order."""
    rows = []
    for f in Path(sweep_dir).glob(f"*/{STATUS_FILE}"):
        try:
            st = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if float(st.get("finished", 0)) >= since:
            rows.append(st)
    return sorted(rows, key=lambda r: int(r.get("num", 0)))


def format_table(rows: list[dict]) -> str:
    head = ("#", "job", "status", "log")
    body = [(str(r.get("num")), str(r.get("job")), str(r.get("status")),
             f"{r.get('log')}  ({r.get('error')})" if r.get("status") == "failed" else "") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x[:3], widths)) + "  " + x[3] for x in
             [head, tuple("-" * w for w in widths) + ("---",), *body]]
    return "\n".join(line.rstrip() for line in lines)


class SweepTable(Callback):
    """Prints the sweep's job table when a ``-m`` sweep ends; exits 1 if any job failed."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = read_statuses(Path(config.hydra.sweep.dir), self.started - 1.0)
        if not rows:
            return
        print(f"\nsweep: {len(rows)} jobs in {config.hydra.sweep.dir}")
        print(format_table(rows))
        failed = [r for r in rows if r.get("status") == "failed"]
        if failed:
            print(f"clipgen: error: {len(failed)} of {len(rows)} sweep jobs failed (their logs are listed above); "
                  "rerun the same command to retry them: finished work is skipped", file=sys.stderr)
            raise SystemExit(1)
