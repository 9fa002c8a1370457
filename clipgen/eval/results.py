"""``eval/results.jsonl``: one JSON line per (checkpoint, task), appended and fsynced (SPEC §9).

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
from clipgen.errors import ClipgenError
from clipgen.utils import atomic_write_text

log = logging.getLogger("clipgen.eval")


def _nan_to_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def _null_to_nan(metrics: dict) -> dict:
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def read_results(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """Records of a results.jsonl and whether its last line was cut off (that line is left out). A corrupt line
    anywhere else is an error: it cannot come from a killed append."""
    path = Path(path)
    if not path.exists():
        return [], False
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, truncated = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                truncated = True
                break
            raise ClipgenError(f"{path}:{i + 1} is not valid JSON: expected one result object per line "
                               "(remove or fix that line)") from None
        if not isinstance(rec, dict):
            raise ClipgenError(f"{path}:{i + 1} is not a JSON object: expected one result object per line")
        rec["metrics"] = _null_to_nan(rec.get("metrics") or {})
        records.append(rec)
    # A last line without its newline is also the remains of an interrupted append.
    truncated = truncated or (bool(raw) and not raw.endswith("\n"))
    return records, truncated


def rewrite_results(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_nan_to_null(r), sort_keys=True) + "\n" for r in records))


def append_result(path: str | os.PathLike, record: dict) -> None:
    """Append one line and force it to disk before the next checkpoint starts."""
    line = json.dumps(_nan_to_null(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def done_key(rec: dict) -> tuple[str, str, str]:
    return Path(str(rec.get("checkpoint", ""))).name, str(rec.get("checkpoint_sha256")), str(rec.get("task"))


def exclusive(eval_dir: Path):
    """One evaluator per run at a time (clipgen.runlock: released when the process dies, so never stale)."""
    return runlock.exclusive(eval_dir, "being evaluated", "one clipgen-eval per run at a time")
