"""Small shared helpers: atomic writes, hashing, git provenance, output directories."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from clipgen.errors import ClipgenError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and os.replace: a failed write leaves the previous file intact."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short sha256 of a JSON-serialisable object with sorted keys (spec hashes of worlds and recipes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str | None:
    """Commit of the clipgen checkout (with '-dirty' if it has local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def output_root(root: str) -> Path:
    """Resolve ``paths.root`` and check it is a writable directory (created if missing)."""
    path = Path(os.path.expanduser(str(root))).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipgenError(f"paths.root={root!r} cannot be created ({e.strerror}): expected a writable "
                           "directory (set paths.root=... or $CLIPGEN_ROOT)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ClipgenError(f"paths.root={str(path)!r} is not writable: expected a writable directory "
                           "(set paths.root=... or $CLIPGEN_ROOT)")
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ClipgenError(f"{what} {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ClipgenError(f"{what} {str(path)!r} is not valid JSON (line {e.lineno}: {e.msg})") from None


def process_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A process pool that is safe to start from any process. While this process runs no other Python thread,
    workers are forked (fast: nothing is imported again). Once a thread runs (W&B's, a test runner's), forking
    can deadlock on a lock that thread held, so workers come from a fork server instead. Use it as a context
    manager; ``pool.map`` keeps input order."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor

    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method), initializer=initializer,
                               initargs=initargs)
