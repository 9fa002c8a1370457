"""``eval/results.jsonl``: one JSON line per (checkpoint, task), appended and fsynced (protocol §9).

A pair is finished when a line with the same checkpoint file name, checkpoint sha256 and task exists, so a
killed evaluation resumes where it stopped and a retrained checkpoint is evaluated again. A truncated last
line (the process died mid-write) is dropped and the file rewritten atomically without it. Metrics that are
NaN (empty groups, see clipgen.eval.metrics) are written as JSON ``null`` and read back as NaN.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from clipgen import runlock
from clipgen.rundir import result_key
from clipgen.files import atomic_write_text

log = logging.getLogger("clipgen.eval")


def _nan_to_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj




def rewrite_results(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_nan_to_null(r), sort_keys=True) + "\n" for r in records))


def append_result(path: str | os.PathLike, record: dict) -> None:
    """Append one line and force it to disk before the next checkpoint starts."""
    line = json.dumps(_nan_to_null(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


done_key = result_key  # the key clipgen-eval skips finished (checkpoint, task) pairs by


def exclusive(eval_dir: Path):
    """One evaluator per run at a time (clipgen.runlock: released when the process dies, so never stale)."""
    return runlock.exclusive(eval_dir, "being evaluated", "one clipgen-eval per run at a time")
