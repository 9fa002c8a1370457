"""Read what an offline W&B run wrote: the records of its ``run-<id>.wandb`` file.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version) followed by LevelDB-log
framed chunks (32 KiB blocks; each chunk has a 7-byte header crc32, length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 has no Python reader of its own any more.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: str | Path) -> dict:
    """``{"run_ids", "history", "metrics"}`` over every ``wandb/offline-run-*/run-*.wandb`` under ``run_dir``:
    the run ids of the run records, one dict per history row (key -> decoded value) and the define_metric
    records as ``(name or glob, step_metric)``; ``"runs"``: each run record's id, display name, group, job_type,
    tags and config (each segment of a resumed run writes one)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # The files are written by W&B's service process, which may still be flushing a finished run on a busy
    # machine: shutting the service down first puts every record on disk.
    wandb.teardown()
    out = {"run_ids": [], "history": [], "metrics": [], "runs": []}
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for raw in _payloads(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["run_ids"].append(rec.run.run_id)
                config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
                out["runs"].append({"id": rec.run.run_id, "name": rec.run.display_name, "group": rec.run.run_group,
                                    "job_type": rec.run.job_type, "tags": list(rec.run.tags), "config": config,
                                    "file": str(path)})
            elif kind == "history":
                out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "metric":
                out["metrics"].append((rec.metric.name or rec.metric.glob_name, rec.metric.step_metric))
    return out
