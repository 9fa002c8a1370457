"""Worker processes that die with the process that started them, on every path.

Why this is needed: once a second thread runs (W&B's, for one), workers come from multiprocessing's fork server
(see process_pool below). Each child of the fork server inherits the write end of the pipe on which the
server waits for its client to go away ("alive" fd). After a kill -9 of the trainer the server therefore never
sees the end of that pipe, stays alive, and so do the DataLoader workers (their watchdog only checks that their
parent, the server, is alive) and the resource tracker: about 0.5 GB per worker, for hours. A worker therefore
closes that inherited fd (so the server exits when the trainer dies) and asks the kernel for SIGKILL when its
parent dies (``PR_SET_PDEATHSIG``, Linux), which also covers the fork start method.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_parent_pid: int | None = None  # the parent a bound worker was started by


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


def bind_to_parent(death_signal: int = signal.SIGKILL, leave_ctrl_c_to_parent: bool = True) -> None:
    """Call first thing in a worker process (a DataLoader ``worker_init_fn``, a pool ``initializer``): it gets
    ``death_signal`` when its parent dies, does not keep a fork server alive, and by default leaves Ctrl-C to its
    parent (a terminal sends SIGINT to the whole process group; the parent finishes what it must, then stops its
    workers)."""
    global _parent_pid
    parent = _parent_pid = os.getppid()
    _release_forkserver_alive_fd()
    if leave_ctrl_c_to_parent:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _set_parent_death_signal(death_signal) and os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed


def orphaned() -> bool:
    """True in a bound worker whose parent has died (it was re-parented)."""
    return _parent_pid is not None and os.getppid() != _parent_pid


class _Stdio:
    """This process's stdout and stderr (fds 1 and 2) as they are when the pool starts a worker, which takes them
    over (one forked by the fork server would otherwise write where the server's went)."""

    def __reduce__(self):
        from multiprocessing import reduction

        return _take_stdio, (reduction.DupFd(1), reduction.DupFd(2))


def _take_stdio(out, err) -> None:
    for dup, fd in ((out, 1), (err, 2)):
        new = dup.detach()
        if new != fd:
            os.dup2(new, fd)
            os.close(new)


def bind_stage_worker(env: dict | None = None, stdio=None) -> None:
    """Initializer of a study's stage processes (each trains or evaluates whole runs). When the study process
    dies, even by kill -9, each gets SIGTERM: a trainer saves latest.pt and stops, so nothing trains on unseen
    (before, the runs went on as orphans and a relaunch met them). Ctrl-C reaches them directly: the trainer's
    own handler saves and stops at once rather than after the run. ``env`` and ``stdio``: the study's environment
    and stdout / stderr when the pool started (a worker forked by the fork server starts with the server's;
    multiprocessing itself passes on the working directory); ``stdio`` has taken effect when this runs."""
    bind_to_parent(signal.SIGTERM, leave_ctrl_c_to_parent=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the fork-time bind left Ctrl-C to the parent
    if env is not None:
        os.environ.clear()
        os.environ.update(env)


def stage_pool(workers: int) -> ProcessPoolExecutor:
    """A pool for a study's stage processes. Each is a fresh process for its jobs (no thread, OpenMP pool or state
    of this one; this process's environment, working directory, stdout and stderr as they are now) forked from the
    fork server, which imports torch, open_clip and the stages once for all of them instead of once per worker
    (about 4 CPU seconds each). Workers are bound as bind_stage_worker says."""
    import multiprocessing as mp

    bound_forkserver()
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                               initializer=bind_stage_worker, initargs=(dict(os.environ), _Stdio()))


PRELOAD = "clipgen.forkserver_preload"
CLIENT_ENV = "CLIPGEN_FORKSERVER_CLIENT"  # the pid that started the fork server, for the server's own check
# What the fork server imports once for every child it forks, whoever started it: the children are DataLoader
# workers (they unpickle the loader, then tokenize), a study's stage processes (they train and evaluate) and
# process pools (world images, recipe shards: torch alone would do, the rest costs ~2.5 CPU s once per server).
SERVER_MODULES = ("torch", "open_clip", "clipgen.train.stream", "clipgen.train.loop", "clipgen.eval.run")


def bound_forkserver() -> None:
    """Make the fork server that multiprocessing starts on first use (DataLoader workers, a study's stage
    processes, and process pools once a thread runs) preload clipgen.forkserver_preload first, then
    SERVER_MODULES, instead of this process's main module (which it would import before any module of ours): the
    server dies with this process from its first tenth of a second, each child it forks is bound to it in the
    fork itself, and children start with what they need imported, in pages they share. Call before starting
    any forkserver process."""
    from multiprocessing import forkserver

    os.environ[CLIENT_ENV] = str(os.getpid())
    wanted = [PRELOAD, *SERVER_MODULES]
    if forkserver._forkserver._forkserver_pid is None and forkserver._forkserver._preload_modules != wanted:
        forkserver.set_forkserver_preload(wanted)


def process_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A process pool that is safe to start from any process. While this process runs no other Python thread,
    workers are forked (fast: nothing is imported again). Once a thread runs (W&B's, a test runner's), forking
    can deadlock on a lock that thread held, so workers come from a fork server instead. Either way the workers
    die with this process (bind_to_parent). Use it as a context manager; ``pool.map`` keeps input order."""
    import multiprocessing as mp
    import threading

    bound_forkserver()
    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    return _Pool(max_workers=workers, mp_context=mp.get_context(method), initializer=_init_child,
                 initargs=(initializer, *initargs))


class _Pool(ProcessPoolExecutor):
    def __exit__(self, exc_type, exc, tb):
        # Leaving on an error or Ctrl-C: drop the queued work, wait only for the tasks that are running.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def _init_child(initializer, *args) -> None:
    bind_to_parent()  # no orphans when the parent is killed; Ctrl-C is the parent's to handle
    if initializer is not None:
        initializer(*args)


@contextlib.contextmanager
def torch_threads(n: int = 0):
    """torch's intra-op threads set to ``n`` inside (0: left as they are) and restored on the way out, whatever the
    code inside set them to. Third-party code does: numba's OpenMP layer shares torch's libgomp and sets the
    calling thread's OpenMP threads to every core when it starts (clipgen.analyze.geometry.umap_embed)."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
