"""PreemptionHandler without a cluster: the signal only sets a flag, ranks agree, requeue limits and non-SLURM runs."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import torch.multiprocessing as mp

from dinov2.distributed.env import DistEnv, destroy, init_distributed
from dinov2.run.preemption import PreemptionHandler, RequeueLimitError, default_signal


def test_signal_sets_flag_and_uninstall_restores_previous_handler() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    handler = PreemptionHandler(signals=[signal.SIGUSR2]).install()
    try:
        env = DistEnv()
        assert not handler.should_stop(env)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.received == signal.SIGUSR2
        assert handler.should_stop(env)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_sigterm_is_opt_in() -> None:
    assert PreemptionHandler().signals == (signal.SIGUSR2,)
    assert PreemptionHandler(handle_sigterm=True).signals == (signal.SIGUSR2, signal.SIGTERM)
    with PreemptionHandler(handle_sigterm=True) as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.received == signal.SIGTERM


def test_default_signal_follows_submitit_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert default_signal() == signal.SIGUSR1
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    with pytest.raises(ValueError, match="SIGNOPE"):
        default_signal()


def test_requeue_outside_slurm_returns_false() -> None:
    assert PreemptionHandler().requeue(DistEnv(), environ={}) is False


def test_requeue_limit_is_an_error_before_any_scontrol_call() -> None:
    handler = PreemptionHandler(max_requeues=2)
    with pytest.raises(RequeueLimitError, match="requeued 2 times"):
        handler.requeue(DistEnv(), environ={"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"})
    with pytest.raises(ValueError):
        PreemptionHandler(max_requeues=-1)


def _agreement_worker(index: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(index), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(index), "LOCAL_WORLD_SIZE": "2"})  # this forked worker's own environment
    env = init_distributed(DistEnv.from_environment(use_cuda=False))
    with PreemptionHandler() as handler:
        before = handler.should_stop(env)
        if env.rank == 1:  # only one rank is signalled
            os.kill(os.getpid(), signal.SIGUSR2)
        after = handler.should_stop(env)
        local = handler.requested
    destroy(env)
    with open(f"{out_dir}/rank{index}.json", "w") as f:
        json.dump({"before": before, "after": after, "local": local}, f)


def test_all_ranks_agree_when_one_rank_is_signalled(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_agreement_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert results[0] == {"before": False, "after": True, "local": False}
    assert results[1] == {"before": False, "after": True, "local": True}
