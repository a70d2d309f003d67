"""One owner per output directory: an exclusive ``flock`` on ``<dir>/.lock``, whose text names the holder.

Two trainers (or two curation runs) writing one directory interleave metrics and overwrite each other's checkpoints,
so the second one refuses to start, in one line naming the holder (pid, host, SLURM job, start time).

The kernel drops a ``flock`` when its holder dies, so a lock left by a killed run is free again and is taken over
(logged, with the dead holder's record). Where the filesystem has no ``flock`` (some network mounts answer ENOLCK or
EOPNOTSUPP) the record alone decides: a holder on this host whose pid is gone is stale and taken over, as is the
previous incarnation of the same SLURM job (a requeued job keeps its id); any other holder is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger("dinov2")

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirectoryLockedError(RuntimeError):
    """Another live process owns the directory; the message is one line naming it."""


def _this_holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:3]])[:120],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe_holder(holder: dict) -> str:
    """"pid 12 on host h (SLURM job 7, `python -m dinov2.train`, since 2026-01-01 10:00:00)"."""
    if not holder:
        return "another process (no holder record)"
    extras = [f"SLURM job {holder['slurm_job_id']}"] if holder.get("slurm_job_id") else []
    if holder.get("command"):
        extras.append(f"`{holder['command']}`")
    if holder.get("started"):
        extras.append(f"since {holder['started']}")
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return text + (f" ({', '.join(extras)})" if extras else "")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    try:
        holder = json.loads(data.decode("utf-8", errors="replace")) if data.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    """A record whose process is certainly gone: on this host with a dead pid, or this SLURM job's earlier run."""
    if not holder:
        return True
    job = os.environ.get("SLURM_JOB_ID", "")
    if job and holder.get("slurm_job_id") == job:
        return True  # a requeued job: its previous incarnation was killed before this one started
    if holder.get("host") == socket.gethostname():
        try:
            return not pid_alive(int(holder.get("pid", -1)))
        except (TypeError, ValueError):
            return True
    return False


class DirectoryLock:
    """Exclusive ownership of ``directory`` for the life of this object (or a ``with`` block).

    Args:
        directory: created if missing.
        purpose: what the owner does, for the refusal message (e.g. "training run").

    Raises (from :meth:`acquire`):
        DirectoryLockedError: another live process holds it.
        OSError: the directory cannot be created or the lock file written (read-only, not a directory...).
    """

    def __init__(self, directory: str | Path, purpose: str = "run") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = self._lock(fd)
            record = json.dumps(_this_holder()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if previous and previous.get("pid") != os.getpid():
            logger.info("took over the lock of %s in %s: its holder %s is gone", self.purpose, self.directory,
                        describe_holder(previous))
        return self

    def _lock(self, fd: int) -> dict:
        """Takes the lock on ``fd``; returns the previous holder's record (stale, since we got it)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(_read_holder(fd)) from None
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                raise
            holder = _read_holder(fd)  # no flock here: the record alone decides
            if not _is_stale(holder):
                raise self._refusal(holder) from None
            return holder
        return _read_holder(fd)

    def _refusal(self, holder: dict) -> DirectoryLockedError:
        return DirectoryLockedError(
            f"{self.directory} is in use by another {self.purpose}: {describe_holder(holder)}; wait for it to finish,"
            f" stop it, or choose another output directory (lock file {self.path})"
        )

    def release(self) -> None:
        """Clears the record and drops the lock (the file stays: removing it would race with a new owner)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a full or read-only disk must not turn a finished run into a failure
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
