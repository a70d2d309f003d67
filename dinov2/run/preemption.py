"""Preemption and timeout: a signal sets a flag, all ranks agree at an iteration boundary, rank 0 requeues the job.

Why not submitit's own handler: it runs the checkpoint inside rank 0's signal handler, but a sharded save is a
collective. Here the handler only records the signal; the training loop asks ``should_stop(env)`` once per iteration
(an all-reduce MAX, so every rank sees the same answer), saves collectively, then calls ``requeue(env)``.

Installed inside the job function, this handler replaces the USR2 handler that ``submitit.core._submit`` installs
at job start (the last ``signal.signal`` call wins), so submitit's checkpoint path only runs if the signal arrives
before the training loop starts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from types import FrameType

from dinov2.distributed.env import DistEnv, all_reduce_max, all_reduce_min, barrier

logger = logging.getLogger("dinov2")

DEFAULT_MAX_REQUEUES = 30  # as the official launcher's slurm_max_num_timeout


class RequeueLimitError(RuntimeError):
    """Raised on every rank when the job has already been requeued ``max_requeues`` times."""


def default_signal() -> signal.Signals:
    """submitit's preemption signal: ``SUBMITIT_PREEMPT_SIGNAL`` (e.g. ``USR2``) or SIGUSR2.

    USR1 is avoided because NCCL may catch it.
    """
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not hasattr(signal.Signals, name):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL names no signal: {name}")
    return signal.Signals[name]


class PreemptionHandler:
    """Turns preemption/timeout signals into a flag that all ranks agree on.

    Args:
        signals: signals that request a stop; default: submitit's preemption signal (SIGUSR2).
        handle_sigterm: also treat SIGTERM as a stop request (off by default: Slurm sends SIGTERM when it kills or
            requeues a job, and then there is no time left for a save).
        max_requeues: how many times ``requeue`` may requeue the same job (``SLURM_RESTART_COUNT`` counts them).
    """

    def __init__(self, signals: Sequence[signal.Signals] | None = None, handle_sigterm: bool = False,
                 max_requeues: int = DEFAULT_MAX_REQUEUES) -> None:
        if max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {max_requeues}")
        chosen = list(signals) if signals is not None else [default_signal()]
        if handle_sigterm and signal.SIGTERM not in chosen:
            chosen.append(signal.SIGTERM)
        self.signals = tuple(signal.Signals(s) for s in chosen)
        self.max_requeues = max_requeues
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: anything more (I/O, collectives, locks) is unsafe at an arbitrary point of the main thread.
        self.received = signal.Signals(signum)

    def install(self) -> PreemptionHandler:
        """Installs the handler for each signal (main thread only), remembering the previous handlers."""
        for sig in self.signals:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal (local view; use ``should_stop`` in a loop)."""
        return self.received is not None

    def should_stop(self, env: DistEnv) -> bool:
        """True on every rank if any rank received a stop signal. Collective: call it on all ranks, same place."""
        stop = all_reduce_max(self.requested, env) > 0
        if stop and self.received is None:
            logger.info("rank %d: stopping because another rank received a preemption signal", env.rank)
        return stop

    def requeue(self, env: DistEnv, environ: Mapping[str, str] | None = None) -> bool:
        """Requeues the SLURM job after the caller has saved; collective, call it on all ranks.

        After a barrier, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``; Slurm then kills every task of the job
        (so the checkpoint must be complete on all ranks before this call), and a task still alive exits with
        ``SystemExit(0)``, which passes through submitit without writing a result, so ``job.result()`` waits for
        the requeued run. Slurm holds a requeued job ~2 minutes (``Reason=BeginTime``) before it runs again.

        Returns:
            False when not running under SLURM (nothing to requeue: rerun the command to resume). Under SLURM it
            does not return.

        Raises:
            RequeueLimitError: the job has been requeued ``max_requeues`` times already (``SLURM_RESTART_COUNT``).
            RuntimeError: ``scontrol requeue`` failed.
        """
        environ = os.environ if environ is None else environ
        job_id = environ.get("SLURM_JOB_ID")
        if not job_id:
            logger.warning("preempted outside SLURM: nothing to requeue; run the same command again to resume")
            return False
        restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            message = (f"SLURM job {job_id} was requeued {restarts} times already (max_requeues={self.max_requeues});"
                       " not requeueing again. The last checkpoint is saved: resubmit to continue.")
            logger.error(message)
            raise RequeueLimitError(message)
        barrier(env)  # every rank has finished its part of the save: the requeue kills all tasks at once
        error = ""
        if env.is_main:
            error = _scontrol_requeue(job_id)
        # Everyone waits for rank 0's answer, so no rank exits before the requeue is registered.
        if all_reduce_min(not error, env) == 0:
            raise RuntimeError(f"could not requeue SLURM job {job_id}: {error or 'failed on rank 0'}")
        logger.warning("requeued SLURM job %s (restart %d of at most %d); exiting", job_id, restarts + 1,
                       self.max_requeues)
        raise SystemExit(0)


def _scontrol_requeue(job_id: str) -> str:
    """Runs ``scontrol requeue``; returns an error text, empty on success."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"scontrol exited with {done.returncode}")
