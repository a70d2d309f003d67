"""DistEnv from SLURM (parsed by submitit), torchrun, partial or empty environments; world-1 helpers; 2-process gloo."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.distributed.env import (
    TORCHRUN_VARS,
    DistEnv,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    destroy,
    init_distributed,
    port_from_job_id,
)

# What srun sets for task 5 of an 8-task step over four nodes.
SLURM_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08,10],cpu3",
    "SLURM_STEP_NODELIST": "gpu[07-08,10],cpu3",
    "SLURM_JOB_NUM_NODES": "4",
    "SLURM_STEP_NUM_NODES": "4",
}
TORCHRUN = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2"}


def _only(environ: dict[str, str]) -> None:
    """Make ``environ`` the process's whole layout: every SLURM and torchrun variable outside it is removed."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in TORCHRUN_VARS:
            del os.environ[name]
    os.environ.update(environ)


@pytest.fixture
def layout(monkeypatch: pytest.MonkeyPatch):
    """``layout(environ)`` sets the process environment to ``environ``; monkeypatch restores it afterwards."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in TORCHRUN_VARS:
            monkeypatch.delenv(name)

    def set_layout(environ: dict[str, str]) -> None:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)

    return set_layout


def test_from_slurm_step(layout) -> None:
    layout(SLURM_STEP)
    env = DistEnv.from_environment(use_cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert env.master_addr == "gpu07"  # submitit expands the compressed host list, zero padding kept
    assert env.master_port == port_from_job_id("4242")
    assert 20000 <= env.master_port < 60000
    assert not env.is_main
    assert (env.device, env.backend) == (torch.device("cpu"), "gloo")


def test_slurm_step_values_win_over_job_values_and_master_port_overrides(layout) -> None:
    layout({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "cpu3",
            "SLURM_PROCID": "1", "MASTER_PORT": "12345"})
    env = DistEnv.from_environment(use_cuda=False)
    assert (env.world_size, env.local_world_size, env.master_addr, env.master_port) == (2, 2, "cpu3", 12345)


def test_cuda_device_follows_local_rank(layout) -> None:
    layout(SLURM_STEP)
    env = DistEnv.from_environment(use_cuda=True)  # only reads the layout: no CUDA call is made
    assert (env.device, env.backend) == (torch.device("cuda", 1), "nccl")


def test_slurm_batch_script_without_step_is_single_process(layout) -> None:
    layout({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"})
    env = DistEnv.from_environment(use_cuda=False)
    assert (env.rank, env.world_size) == (0, 1)


def test_malformed_slurm_values_are_errors(layout) -> None:
    layout({**SLURM_STEP, "SLURM_PROCID": "five"})
    with pytest.raises(ValueError, match="malformed SLURM environment"):
        DistEnv.from_environment(use_cuda=False)


def test_port_differs_between_consecutive_jobs() -> None:
    ports = {port_from_job_id(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100
    assert port_from_job_id("77_3") == port_from_job_id("773")


def test_from_torchrun_takes_precedence_over_slurm(layout) -> None:
    layout({**SLURM_STEP, **TORCHRUN})
    env = DistEnv.from_environment(use_cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_partial_torchrun_env_names_the_missing_variables(layout) -> None:
    layout({k: TORCHRUN[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE")})
    with pytest.raises(ValueError, match="partially set") as caught:
        DistEnv.from_environment(use_cuda=False)
    for name in ("MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        assert name in str(caught.value)


def test_malformed_values_are_errors(layout) -> None:
    layout({**TORCHRUN, "RANK": "three"})
    with pytest.raises(ValueError, match="RANK"):
        DistEnv.from_environment(use_cuda=False)
    layout({"RANK": "4"})
    with pytest.raises(ValueError, match="outside"):
        DistEnv.from_environment(use_cuda=False)


def test_empty_environment_is_single_process_and_helpers_need_no_group(layout) -> None:
    layout({})
    env = init_distributed(DistEnv.from_environment(use_cuda=False))
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
    assert not dist.is_initialized()
    assert all_reduce_max(True, env) == 1.0
    assert all_reduce_min(2.5, env) == 2.5
    assert all_reduce_sum(7.0, env) == 7.0
    barrier(env)
    destroy(env)
    assert not dist.is_initialized()


def test_distenv_is_frozen() -> None:
    env = DistEnv()
    with pytest.raises(AttributeError):
        env.rank = 1  # type: ignore[misc]


def _gloo_worker(index: int, port: int, out_dir: str) -> None:
    _only({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(index), "WORLD_SIZE": "2",
           "LOCAL_RANK": str(index), "LOCAL_WORLD_SIZE": "2"})  # this forked worker's own environment
    env = init_distributed(DistEnv.from_environment(use_cuda=False))
    result = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": all_reduce_sum(env.rank + 1, env),
        "max": all_reduce_max(env.rank == 1, env),
        "min": all_reduce_min(env.rank == 1, env),
    }
    barrier(env)
    destroy(env)
    with open(f"{out_dir}/rank{index}.json", "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_from_torchrun_style_env(tmp_path) -> None:
    # fork: the worker is defined in a test module that a spawned child could not import by name.
    mp.start_processes(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, result in enumerate(results):
        assert result == {"rank": i, "world": 2, "sum": 3.0, "max": 1.0, "min": 0.0}
