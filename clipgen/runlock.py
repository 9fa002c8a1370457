"""One process at a time per output directory: an exclusive ``flock`` on a lock file inside it.

The kernel releases a flock when its holder dies, however it dies (kill -9, preemption, OOM), so a lock file left
behind never blocks a rerun. The holder writes its pid and host into the file, so that the process turned away
can say who is working there. Used by the trainer (one per run directory) and by clipgen-eval (one per eval
directory). A holder that ends having written nothing else there (a run refused at start: a bad shard, the leak
guard, a failing sweep job) removes the lock file and the then empty directory, so no run directory holding only
``.lock`` is left to puzzle over.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clipgen.errors import ClipgenError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _holder(f) -> str:
    f.seek(0)
    text = f.read().strip()
    return text or "a process that has not written its pid yet"


def _open_lock(directory: Path):
    """The lock file, opened for appending ("a+" neither truncates, so the holder's pid stays readable, nor fails
    when it exists); the directory is made first, again if a holder that wrote nothing removed it meanwhile."""
    for attempt in range(3):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            return open(directory / LOCK_NAME, "a+", encoding="utf-8")
        except FileNotFoundError:
            if attempt == 2:
                raise


@contextmanager
def exclusive(directory: str | os.PathLike, what: str, expected: str) -> Iterator[None]:
    """Hold ``{directory}/.lock`` for the duration of the block. Raises ClipgenError (one line naming the
    directory and the holder) when another live process holds it; ``what`` says what the holder is doing,
    ``expected`` what the user should expect instead ("one clipgen-train per run directory")."""
    directory = Path(directory)
    with _open_lock(directory) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                raise ClipgenError(f"{str(directory)!r} is {what} by {_holder(f)}: expected {expected}; wait for it "
                                   "to finish or stop it (its lock is released when it exits)") from None
            # Some network filesystems do not support flock; go on unlocked rather than not at all.
            log.warning("%s: cannot lock (%s); make sure no other process works in this directory", directory, e)
        else:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
            f.flush()
        try:
            yield
        finally:
            _remove_if_only_lock(directory)


def _remove_if_only_lock(directory: Path) -> None:
    # Still holding the lock: a second process is refused until then, and one that opens the path afterwards
    # creates the directory and the file anew.
    try:
        if [p.name for p in directory.iterdir()] == [LOCK_NAME]:
            (directory / LOCK_NAME).unlink()
            directory.rmdir()
    except OSError:  # another process wrote there meanwhile, or the directory went away: nothing to tidy
        pass
