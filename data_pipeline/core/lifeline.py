"""Processes that die with the curation CLI.

When the CLI process is killed, even by SIGKILL as the OOM killer does, nothing it started may live on: a caller
reading its stderr would wait for an end of file that the survivors hold back, and they would keep burning cores.
Python does not arrange this. A forkserver pool's workers hold the write end of the forkserver's "alive" pipe and of
their own task queue, so the forkserver, the workers and the resource tracker keep each other alive, idle, for
ever. The fix is in three parts:

- the forkserver asks the kernel for SIGKILL when its parent (the CLI) dies (``PR_SET_PDEATHSIG``; armed by
  :mod:`data_pipeline.core.forkserver_preload`, which the forkserver imports at start);
- every pool or loader worker does the same for its own parent (:func:`die_with_parent`), and also watches the
  CLI process directly (:func:`watch_process`, a ``pidfd`` where Linux has one), in case its parent outlives it;
- the resource tracker exits by itself once every process holding its pipe is gone.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import select
import signal
import sys
import threading
import time

# prctl(2) option: the signal the kernel sends this process when its parent thread exits.
PR_SET_PDEATHSIG = 1
# The CLI process's pid, inherited by the forkserver so that it knows whose death to follow.
OWNER_ENV = "DATA_PIPELINE_OWNER_PID"
PRELOAD_MODULE = "data_pipeline.core.forkserver_preload"


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere).

    Args:
        expected_parent: the parent's pid; if the parent is already gone (this process was re-parented before
            the request took effect), exit now.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def _wait_for_exit(pid: int, poll_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(poll_s)
    try:
        select.select([fd], [], [])  # a pidfd turns readable when its process exits
    finally:
        os.close(fd)


def watch_process(pid: int, poll_s: float = 0.5) -> None:
    """Start a daemon thread that SIGKILLs this process as soon as process ``pid`` has exited."""

    def watch() -> None:
        _wait_for_exit(pid, poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"lifeline-{pid}", daemon=True).start()


def arm_forkserver() -> mp.context.BaseContext:
    """The forkserver context, set up so that a forkserver started from here dies with this process.

    Must run before the forkserver first starts (later calls change nothing for a running server, which is then
    already armed or was started by someone else).
    """
    ctx = mp.get_context("forkserver")
    os.environ[OWNER_ENV] = str(os.getpid())
    ctx.set_forkserver_preload(["__main__", PRELOAD_MODULE])  # "__main__" is Python's default preload
    return ctx


def init_child(owner_pid: int) -> None:
    """In a worker process: die with the parent and with the CLI process ``owner_pid``."""
    die_with_parent()
    if owner_pid != os.getppid():
        watch_process(owner_pid)
