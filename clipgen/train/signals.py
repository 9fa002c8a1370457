"""Stopping a trainer from outside: SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before preemption or the time
limit) and SIGINT (Ctrl-C) become a flag the loop checks at step boundaries; after latest.pt is saved, the job
is requeued where that is what the signal means."""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class StopSignals:
    """Turn SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a flag checked at step boundaries; previous handlers come back on
    exit. A second SIGINT raises KeyboardInterrupt (Ctrl-C twice: stop now, without saving). Handlers can only be
    installed from the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def previous(self, name: str):
        """The handler that was installed for signal ``name`` before this one (submitit's, under submitit)."""
        return self._previous.get(getattr(signal, name, None))


def requeue_after_stop(stopped: str, handler, enabled: bool) -> str:
    """After latest.pt is saved on a stop signal: who brings the job back. Under submitit, its own handler
    (checkpoint + requeue; rank 0 exits there). Under a plain SLURM job, ``scontrol requeue`` on SIGUSR1/SIGUSR2
    (``#SBATCH --signal=USR1@180`` before the time limit); SIGTERM is scancel's signal (and preemption with
    PreemptMode=REQUEUE requeues by itself), so it never requeues. Returns what happened, for the log."""
    if not enabled:
        return "trainer.requeue=false"
    if stopped == "SIGINT":  # the user asked to stop
        return "not requeued"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        if callable(handler):
            handler(getattr(signal, stopped), None)
            return "submitit's handler requeued the job"
        return "submitit: no handler to delegate to"
    job = os.environ.get("SLURM_JOB_ID")
    if not job or stopped == "SIGTERM":
        return "not requeued"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e})"
    if out.returncode:
        return f"scontrol requeue {job} failed: {out.stderr.strip() or out.returncode}"
    return f"requeued SLURM job {job}"
