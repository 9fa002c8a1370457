"""Worker processes that die with the process that started them, on every path.

Why this is needed: once a second thread runs (W&B's, for one), workers come from multiprocessing's fork server
(see clipgen.utils.process_pool). Each child of the fork server inherits the write end of the pipe on which the
server waits for its client to go away ("alive" fd). After a kill -9 of the trainer the server therefore never
sees the end of that pipe, stays alive, and so do the DataLoader workers (their watchdog only checks that their
parent, the server, is alive) and the resource tracker: about 0.5 GB per worker, for hours. A worker therefore
closes that inherited fd (so the server exits when the trainer dies) and asks the kernel for SIGKILL when its
parent dies (``PR_SET_PDEATHSIG``, Linux), which also covers the fork start method.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _release_forkserver_alive_fd() -> None:
    """Close this child's copy of the fork server's 'alive' pipe (a child never starts processes through the
    server itself)."""
    try:
        from multiprocessing import forkserver
    except ImportError:
        return
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None


def bind_to_parent() -> None:
    """Call first thing in a worker process (a DataLoader ``worker_init_fn``, a pool ``initializer``): it is
    killed when its parent dies, does not keep a fork server alive, and leaves Ctrl-C to its parent (a terminal
    sends SIGINT to the whole process group; the parent finishes what it must, then stops its workers)."""
    parent = os.getppid()
    _release_forkserver_alive_fd()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _set_parent_death_signal(signal.SIGKILL) and os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed
