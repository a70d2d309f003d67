"""One owner per output directory: flock with a holder record; dead holders and a requeued job's own lock are taken
over; without flock support the record alone decides."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.io import lock as lock_module
from dinov2.io.lock import LOCK_NAME, DirectoryLock, DirectoryLockedError

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from dinov2.io.lock import DirectoryLock\n"
    "DirectoryLock(sys.argv[1], 'training run').acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLockedError) as info:
            DirectoryLock(tmp_path, "training run").acquire()
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and str(tmp_path) in message
    finally:
        holder.kill()  # SIGKILL: no cleanup, the record stays, the kernel drops the flock
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with DirectoryLock(tmp_path) as taken:
        assert json.loads(taken.path.read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: the record is cleared, the file stays


def test_same_process_twice_is_refused_and_release_frees(tmp_path):
    first = DirectoryLock(tmp_path / "new").acquire()  # creates the directory
    with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}"):
        DirectoryLock(tmp_path / "new").acquire()
    first.release()
    DirectoryLock(tmp_path / "new").acquire().release()


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    record = tmp_path / LOCK_NAME
    host = socket.gethostname()
    cases = [
        ({"pid": os.getppid(), "host": host}, False),  # alive on this host
        ({"pid": 1234, "host": "some-other-node"}, False),  # elsewhere: cannot be checked, so refused
        ({"pid": _dead_pid(), "host": host}, True),  # dead on this host: stale
        ({}, True),  # no record at all
    ]
    for holder, taken in cases:
        record.write_text(json.dumps(holder))
        if taken:
            DirectoryLock(tmp_path).acquire().release()
        else:
            with pytest.raises(DirectoryLockedError, match=f"pid {holder['pid']} on host {holder['host']}"):
                DirectoryLock(tmp_path).acquire()
    # A requeued SLURM job keeps its id: its earlier incarnation's lock (on another node) is its own.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    record.write_text(json.dumps({"pid": 99, "host": "some-other-node", "slurm_job_id": "4242"}))
    DirectoryLock(tmp_path).acquire().release()


def test_pid_alive():
    assert lock_module.pid_alive(os.getpid()) and not lock_module.pid_alive(_dead_pid())


def test_curation_entry_point_stays_torch_free():
    # Curation workers re-import the CLI module under a memory cap; the lock and error helpers must not pull torch in.
    code = ("import sys, data_pipeline.curate, dinov2.io.lock, dinov2.io.errors, dinov2.io.atomic; "
            "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0
