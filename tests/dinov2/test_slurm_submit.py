"""dinov2.run (slurm, submit, cli): cluster YAML + flags -> submitit parameters; on the real cluster: a 2-task
gloo job, preemption with a checkpoint and requeue, the requeue limit, and a bad partition refused before anything
is submitted."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from dinov2.run.cli import build_parser
from dinov2.run.job import TrainRequest
from dinov2.run.slurm import ClusterConfig, executor_parameters, load_cluster_config, submit
from dinov2.run.submit import TrainingJob, cluster_config_from_args, submit_training, wants_cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
# The job functions below live in a test module that the job's interpreter cannot import by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _submit(argv: list[str]) -> int:
    """What ``python -m dinov2.train ARGV`` does once it has decided to submit."""
    args = build_parser().parse_args(argv)
    return submit_training(TrainRequest(args.config_file, args.output_dir, tuple(args.opts), not args.no_resume), args)


def test_shipped_slurm_yamls_load() -> None:
    cfg = load_cluster_config([REPO_ROOT / "slurm" / "cluster.yaml", REPO_ROOT / "slurm" / "train_1node.yaml"])
    assert cfg.nodes == 1 and cfg.gpus_per_node >= 1
    assert executor_parameters(cfg)["tasks_per_node"] == cfg.gpus_per_node


def test_yaml_files_merge_in_order_then_overrides(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\naccount: lab\nadditional_parameters: {exclude: n1}\n")
    job = tmp_path / "job.yaml"
    job.write_text("partition: long\nnodes: 2\ngpus_per_node: 4\nadditional_parameters: {comment: run}\n")
    cfg = load_cluster_config([site, job], {"timeout_min": 30})
    params = executor_parameters(cfg)
    assert params["slurm_partition"] == "long" and params["slurm_account"] == "lab"
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"], params["timeout_min"]) == (2, 4, 4, 30)
    assert params["slurm_additional_parameters"] == {"exclude": "n1", "comment": "run"}
    assert "slurm_qos" not in params and "mem_gb" not in params


def test_bad_cluster_settings_are_value_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("partiton: gpu\n")
    with pytest.raises(ValueError, match="partiton"):
        load_cluster_config([bad])
    with pytest.raises(ValueError, match="not found"):
        load_cluster_config([tmp_path / "missing.yaml"])
    with pytest.raises(ValueError, match="one task per GPU"):
        ClusterConfig(gpus_per_node=8, tasks_per_node=2)
    with pytest.raises(ValueError, match="nodes"):
        ClusterConfig(nodes=0)


def test_cpu_job_takes_explicit_tasks_per_node() -> None:
    assert ClusterConfig().ntasks_per_node == 1
    assert executor_parameters(ClusterConfig(tasks_per_node=2))["tasks_per_node"] == 2
    assert "gpus_per_node" not in executor_parameters(ClusterConfig(tasks_per_node=2))


def test_cli_flags_parse_into_cluster_settings_and_a_request_without_them() -> None:
    argv = ["--config-file", "c.yaml", "--nodes", "2", "--gpus=4", "--output-dir", "out", "--partition", "p",
            "--slurm-param", "exclude=n1", "--timeout", "90", "--no-resume", "train.x=1"]
    args = build_parser().parse_args(argv)
    assert wants_cluster(args)
    cfg = cluster_config_from_args(args)
    assert (cfg.nodes, cfg.gpus_per_node, cfg.partition, cfg.timeout_min) == (2, 4, "p", 90)
    assert cfg.additional_parameters == {"exclude": "n1"}
    assert (args.config_file, args.output_dir, args.opts, args.no_resume) == ("c.yaml", "out", ["train.x=1"], True)
    assert not wants_cluster(build_parser().parse_args(["--output-dir", "o"]))


def test_request_takes_the_job_id() -> None:
    request = TrainRequest("c.yaml", "runs/%j", ("train.output_tag=%j",)).for_job("77")
    assert request.output_dir == "runs/77" and request.opts == ("train.output_tag=77",)
    assert TrainRequest("c", "runs/%j").for_job("").output_dir == "runs/%j"


def test_training_job_pickles_and_checkpoint_resubmits_itself() -> None:
    request = TrainRequest("", "o")
    job = pickle.loads(pickle.dumps(TrainingJob(request)))
    delayed = job.checkpoint()
    assert isinstance(delayed.function, TrainingJob) and delayed.function is not job
    assert delayed.function.request == request and delayed.args == ()


# --- on the real single-node cluster ---

def _gloo_job() -> dict:
    from dinov2.distributed.env import DistEnv, all_reduce_sum, destroy, init_distributed

    env = init_distributed(DistEnv.from_environment())
    total = all_reduce_sum(env.rank + 1, env)
    destroy(env)
    return {"rank": env.rank, "world": env.world_size, "local": env.local_rank, "sum": total}


def _counting_job(work_dir: str, total: int, max_requeues: int) -> dict:
    """Counts to ``total`` in 0.2 s "iterations"; on USR2 saves the count, then requeues; resumes from the file."""
    import json
    import os

    from dinov2.distributed.env import DistEnv, destroy, init_distributed
    from dinov2.run.preemption import PreemptionHandler

    env = init_distributed(DistEnv.from_environment())
    handler = PreemptionHandler(max_requeues=max_requeues).install()
    work, restart = Path(work_dir), os.environ.get("SLURM_RESTART_COUNT", "0")
    state = work / "state.json"
    step = start = json.loads(state.read_text())["step"] if state.exists() else 0
    with open(work / f"starts_rank{env.rank}.txt", "a") as f:
        f.write(f"{restart} {start}\n")
    while step < total:
        time.sleep(0.2)
        step += 1
        if env.is_main and step == 2:
            (work / f"running_{restart}").touch()
        if handler.should_stop(env):
            if env.is_main:
                (work / "state.tmp").write_text(json.dumps({"step": step}))
                (work / "state.tmp").rename(state)
            handler.requeue(env)
    destroy(env)
    return {"rank": env.rank, "step": step, "start": start, "restart": restart}


def _wait_for(path: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.slurm
def test_two_task_gloo_job(slurm_cluster) -> None:
    cfg = ClusterConfig(partition=slurm_cluster.partition, tasks_per_node=2, cpus_per_task=1, timeout_min=5)
    job = submit(_gloo_job, (), cfg, slurm_cluster.log_root / "gloo")
    slurm_cluster.wait(job, timeout_s=120)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert results == [{"rank": r, "world": 2, "local": r, "sum": 3.0} for r in (0, 1)]


@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    total = 25
    cfg = ClusterConfig(partition=slurm_cluster.partition, tasks_per_node=2, cpus_per_task=1, timeout_min=5)
    job = submit(_counting_job, (str(tmp_path), total, 3), cfg, slurm_cluster.log_root / "preempt")
    _wait_for(tmp_path / "running_0")
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    slurm_cluster.wait(job, timeout_s=150)
    results = sorted(job.results(), key=lambda r: r["rank"])
    saved = results[0]["start"]
    assert 2 <= saved < total, "the requeued run resumes from the step saved on the signal"
    assert results == [{"rank": r, "step": total, "start": saved, "restart": "1"} for r in (0, 1)]
    for rank in (0, 1):  # both ranks stopped at the same iteration and restarted exactly once
        assert (tmp_path / f"starts_rank{rank}.txt").read_text().splitlines() == ["0 0", f"1 {saved}"]
    log = "".join(p.read_text() for p in job.paths.folder.glob("*_log.*"))
    assert "Caught signal" not in log, "submitit's own USR2 handler must have been replaced by ours"


@pytest.mark.slurm
def test_requeue_limit_fails_the_job_with_a_clear_message(slurm_cluster, tmp_path: Path) -> None:
    cfg = ClusterConfig(partition=slurm_cluster.partition, cpus_per_task=1, timeout_min=5)
    job = submit(_counting_job, (str(tmp_path), 100, 0), cfg, slurm_cluster.log_root / "limit")
    _wait_for(tmp_path / "running_0")
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    slurm_cluster.wait(job, timeout_s=120)
    with pytest.raises(Exception, match="requeued 0 times already"):
        job.result()
    assert (tmp_path / "state.json").exists(), "the checkpoint is written before the limit is checked"


@pytest.mark.slurm
def test_bad_partition_is_refused_before_submitting(slurm_cluster, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="'no-such-partition' does not exist.*debug"):
        submit(_gloo_job, (), ClusterConfig(partition="no-such-partition"), tmp_path / "logs")
    assert not (tmp_path / "logs").exists()
    assert _submit(["--output-dir", str(tmp_path / "run"), "--partition", "no-such-partition"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-partition" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
def test_submit_training_submits_the_request_without_cluster_flags(slurm_cluster, tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("train: {}\n")
    out = tmp_path / "run"
    argv = ["--config-file", str(config), "--output-dir", str(out), "--partition", slurm_cluster.partition,
            "--tasks-per-node", "1", "--timeout-min", "2", "train.max_iter=3"]
    missing = ["--config-file", str(tmp_path / "nope.yaml")] + argv[2:]
    assert _submit(missing) == 2
    assert "config file not found" in capsys.readouterr().err
    assert _submit(argv) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("submitted SLURM job ")[1].split(":")[0]
    subprocess.run(["scancel", job_id], check=False)  # only the submission is under test, not the trainer
    assert f"{out}/slurm/{job_id}/{job_id}_0_log.out" in printed
    submitted = cloudpickle.loads((out / "slurm" / job_id / f"{job_id}_submitted.pkl").read_bytes())
    assert isinstance(submitted.function, TrainingJob)
    assert submitted.function.request == TrainRequest(str(config), str(out), ("train.max_iter=3",))
