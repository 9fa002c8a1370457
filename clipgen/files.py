"""Files written so that nothing is lost: atomic writes (a reader sees the old file or the new one, never a part),
one-line errors for a full disk, sweeping what killed writers left behind, reading JSON with an error that names
the file, and the output root."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from clipgen.errors import ClipgenError


STALE_TMP_S = 2 * 3600  # a temporary build directory untouched this long was killed (a large world takes minutes)
# OS errors that mean "this disk cannot take the bytes", as opposed to a missing input.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


class WriteError(ClipgenError, OSError):
    """A file could not be written (disk full, quota, read-only, I/O error). Still an OSError, so callers that
    tolerate an unwritable optional file (the index cache) keep doing so; console scripts print it as one line."""


class _IncompleteWrite(Exception):
    """Internal: a writer (torch.save) failed to write all bytes without saying why."""


def _umask() -> int:
    # /proc gives it without the set-and-restore race of os.umask (another thread could create a file meanwhile).
    try:
        with open("/proc/self/status", "r") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def free_space(path: str | os.PathLike) -> str:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent), in words."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    if free < 1024:
        return f"{free} B free"
    units = ("KB", "MB", "GB", "TB")
    power = min(len(units), int(math.log(free, 1024)))
    return f"{free / 1024 ** power:.1f} {units[power - 1]} free"


def write_error(path: str | os.PathLike, err: BaseException, what: str = "file") -> WriteError:
    """One line for a failed write: the path, the cause and the free space left there."""
    cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
    hint = "free some space or set paths.root=... to a larger disk" if (
        getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or not isinstance(err, OSError)
    ) else "check that the path is writable"
    return WriteError(f"cannot write {what} {str(path)!r}: {cause} ({free_space(Path(path).parent)} there); "
                      f"nothing is lost, earlier files are kept: {hint}")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the new name survives a power loss, not only the file's bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself was synced
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write, what: str) -> None:
    """Write through ``write(fileobj)`` into a temporary sibling, fsync, give it the mode a plain ``open`` would
    (mkstemp makes 0600 files, unreadable to collaborators on a shared directory), rename into place and fsync the
    directory. Any failure removes the temporary file, leaves the previous file intact and, for an OS-level cause
    (disk full ...), raises WriteError naming the path and the free space."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e, what) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (OSError, _IncompleteWrite)) and not isinstance(e, ClipgenError):
            raise write_error(path, e, what) from None  # after the unlink: the free space is what is left
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    _atomic_write(path, lambda f: f.write(data), "file")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and os.replace: a failed write leaves the previous file intact."""
    import torch

    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] ... unexpected
            # pos" and drops the OS error; a full disk is the usual cause.
            if "inline_container" in str(e):
                raise _IncompleteWrite("torch.save could not write all bytes") from None
            raise

    _atomic_write(path, write, "checkpoint")


def sweep_temp_files(directory: str | os.PathLike, patterns: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files (glob ``patterns``) that killed writers left in ``directory``. Only call it
    while holding the lock that every writer of these files holds, so none of them can belong to a live writer."""
    removed = []
    for pattern in patterns:
        for p in Path(directory).glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def is_disk_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, ClipgenError) and err.errno in DISK_ERRNOS


def sweep_stale_dirs(parent: str | os.PathLike, pattern: str, max_age_s: float = STALE_TMP_S) -> list[Path]:
    """Delete temporary build directories (glob ``pattern``) in which nothing changed for ``max_age_s``: their
    builder was killed. Judged by age, not by pid, because the output root may be shared by several hosts whose
    pids mean nothing here; the newest entry counts, since a live builder keeps writing into its directory."""
    now, removed = time.time(), []
    for d in Path(parent).glob(pattern):
        try:
            newest = max([d.stat().st_mtime, *(p.stat().st_mtime for p in d.iterdir())])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


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
