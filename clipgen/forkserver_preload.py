"""Imported only by multiprocessing's fork server, as a preload module (clipgen.procs.bound_forkserver).

A worker the server forks is unpickled, and may import its parent's main module, before any code of ours runs in
it; a ``worker_init_fn`` binds it to its parent only after that. Killed in this window, the trainer left the
server, a worker and the resource tracker alive for seconds (issue: "kill -9 during loader start-up"). Importing
this module in the server closes the window: the server gets SIGKILL when the process that started it dies, and
every child it forks is bound to the server (clipgen.procs.bind_to_parent) in the fork itself, before it reads a
byte of its task.
"""
from __future__ import annotations

import os
import signal

from clipgen.procs import CLIENT_ENV, _set_parent_death_signal, bind_to_parent

if _set_parent_death_signal(signal.SIGKILL) and str(os.getppid()) != os.environ.get(CLIENT_ENV, str(os.getppid())):
    os._exit(1)  # the process that started the server died before the signal was armed
os.register_at_fork(after_in_child=bind_to_parent)
