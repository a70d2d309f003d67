"""Executors that map per-shard functions: a local process pool, or a SLURM job array submitted through
`dinov2.run.slurm` (the project's one submitit path and cluster-settings schema).

Both share one signature, `run(tasks, desc) -> failed shard ids`, and the same worker code, so their outputs are
byte-identical. A worker that dies or hangs never takes a stage down: its shard is re-run alone, then item by item,
and the culprit item gets a reject reason instead of a result.

Global stages (near-dup and kNN search, decontamination, k-means) split their work into `SliceTask`s instead: slices of
query rows or points against state every slice reads from disk (a trained index, the current centroids). `run_slices`
runs the slices whose output file is missing, in this process or as one SLURM job array through the same
`submit_array`; each slice writes its own output atomically, so the caller's reduction reads the same files, in the
same order, whichever way they were computed.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from tqdm import tqdm

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, ExecutorConfig
from data_pipeline.core.lifeline import arm_forkserver, init_child
from dinov2.run.slurm import ClusterConfig, load_cluster_config, submit_array

# Test hook: seconds each shard sleeps before its part is written (lets the kill-and-resume test land mid-stage).
SLEEP_ENV = "DATA_PIPELINE_SHARD_SLEEP_S"
log = logging.getLogger(__name__)
Item = TypeVar("Item")


@dataclass
class ShardTask:
    """One shard of one stage: rows in, one Parquet part out."""

    stage: str
    shard: int
    map_shard: Callable[[CurateConfig, pa.Table], pa.Table]
    reject_item: Callable[[pa.Table, str], pa.Table] | None
    cfg: CurateConfig
    rows: pa.Table
    out_path: str


def init_worker(memory_mb: int, owner_pid: int = 0) -> None:
    """Pool initializer: die with the CLI process `owner_pid` (and with the forkserver), cap the worker's address
    space and keep numeric libraries single-threaded."""
    if owner_pid:
        init_child(owner_pid)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def compute_rows(task: ShardTask) -> pa.Table:
    """Worker body: the stage's per-shard function on the task's rows."""
    return task.map_shard(task.cfg, task.rows)


def execute_task(task: ShardTask) -> int:
    """Worker body: compute and atomically write one part; returns the number of rows."""
    table = compute_rows(task)
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    artifacts.write_parquet_atomic(Path(task.out_path), table)
    return task.rows.num_rows


class LocalExecutor:
    """Process pool over shards (default: all cores), with per-worker memory caps and crash isolation."""

    def __init__(self, workers: int, memory_mb: int, item_timeout_s: float, max_retries: int) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.item_timeout_s = item_timeout_s
        self.max_retries = max_retries

    def _pool(self, n: int) -> cf.ProcessPoolExecutor:
        # forkserver: workers never inherit OpenMP/faiss state from the parent (libgomp is not fork-safe). Armed so
        # that the forkserver and the workers die with this process, however it dies.
        ctx = arm_forkserver()
        return cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=init_worker,
                                      initargs=(self.memory_mb, os.getpid()))

    @staticmethod
    def _kill(pool: cf.ProcessPoolExecutor) -> None:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def _map(self, tasks: list[ShardTask], bar: tqdm) -> tuple[list[ShardTask], list[ShardTask]]:
        """Run tasks in one pool. Returns (tasks that raised, tasks whose worker died or hung)."""
        raised, crashed = [], []
        pool = self._pool(min(self.workers, len(tasks)))
        futures = {pool.submit(execute_task, t): t for t in tasks}
        timeout = self.item_timeout_s * max(t.rows.num_rows for t in tasks) + 10
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            if not done:  # nothing finished for a whole shard's time budget: a worker hangs
                crashed.extend(futures[f] for f in pending)
                break
            for f in done:
                try:
                    bar.update(f.result())
                except cf.process.BrokenProcessPool:
                    crashed.append(futures[f])
                except Exception:
                    raised.append(futures[f])
        self._kill(pool)
        return raised, crashed

    def _isolate(self, task: ShardTask, bar: tqdm) -> bool:
        """Re-run a crashing shard item by item in a single worker, replaced whenever it dies or hangs."""
        if task.reject_item is None:
            return False
        pieces, pool, culprits = [], self._pool(1), 0
        for i in range(task.rows.num_rows):
            row = task.rows.slice(i, 1)
            sub = ShardTask(task.stage, task.shard, task.map_shard, task.reject_item, task.cfg, row, task.out_path)
            try:
                pieces.append(pool.submit(compute_rows, sub).result(timeout=self.item_timeout_s + 5))
                continue
            except cf.TimeoutError:
                pieces.append(task.reject_item(row, "worker_timeout"))
                self._kill(pool)
                pool = self._pool(1)
            except cf.process.BrokenProcessPool:
                pieces.append(task.reject_item(row, "worker_crashed"))
                self._kill(pool)
                pool = self._pool(1)
            except Exception as exc:  # the stage's own error handler let something through: keep it as data
                pieces.append(task.reject_item(row, f"error:{type(exc).__name__}"))
            culprits += 1
        self._kill(pool)
        if culprits == len(pieces) > 1:
            return False  # every item failing points at the environment, not at hostile files: fail the shard
        artifacts.write_parquet_atomic(Path(task.out_path), pa.concat_tables(pieces))
        bar.update(task.rows.num_rows)
        return True

    def run(self, tasks: list[ShardTask], desc: str = "") -> list[int]:
        """Run all tasks; returns the shard ids that still failed after `max_retries` retries."""
        bar = tqdm(total=sum(t.rows.num_rows for t in tasks), desc=desc, unit="img", dynamic_ncols=True)
        pending = list(tasks)
        for _ in range(self.max_retries + 1):
            if not pending:
                break
            raised, crashed = self._map(pending, bar)
            suspects = list(raised)
            for task in crashed:
                # Re-run alone first: a crash may have been a neighbour's, reported to every future of the pool.
                r, c = self._map([task], bar)
                suspects.extend(r + c)
            pending = [t for t in suspects if not self._isolate(t, bar)]
        bar.close()
        return sorted(t.shard for t in pending)


def run_group(tasks: list[ShardTask], workers: int, memory_mb: int, item_timeout_s: float) -> list[int]:
    """Body of one SLURM array task: a local pool over a group of shards; returns failed shard ids."""
    return LocalExecutor(workers, memory_mb, item_timeout_s, max_retries=0).run(tasks, desc=f"group{tasks[0].shard}")


def cluster_settings(ex: ExecutorConfig) -> ClusterConfig:
    """Per-task resources of the array: the `executor.slurm_files` cluster YAMLs merged in order, then a non-empty
    `executor.slurm_partition` over their partition."""
    return load_cluster_config(ex.slurm_files, {"partition": ex.slurm_partition} if ex.slurm_partition else None)


def submit_rounds(items: list[Item], fn: Callable[..., Any], args_of: Callable[[Item], tuple],
                  left: Callable[[Item, Any], Item | None], cluster: ClusterConfig, folder: Path, *,
                  max_retries: int, desc: str, unit: str) -> list[Item]:
    """Submit `fn(*args_of(item))` for every item as one SLURM job array, then again for what is left, up to
    `max_retries` more times; returns what is still left.

    `left(item, result)` is the part of `item` to run again (None: nothing); `result` is what the array task
    returned, or None when it raised or died (node failure, OOM kill).
    """
    pending = list(items)
    for _ in range(max_retries + 1):
        if not pending:
            break
        # A fresh folder per submission: reused SLURM job ids must never pick up an older result pickle.
        sub = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        jobs = submit_array(fn, [args_of(item) for item in pending], cluster, sub)
        retry = []
        for item, job in tqdm(list(zip(pending, jobs)), desc=f"{desc} (slurm)", unit=unit, dynamic_ncols=True):
            try:
                result = job.result()
            except Exception:
                result = None
            rest = left(item, result)
            if rest is not None:
                retry.append(rest)
        pending = retry
    return pending


class SlurmExecutor:
    """A submitit job array: one array task per group of shards; failed groups are resubmitted and reported."""

    def __init__(self, cfg: CurateConfig, folder: Path) -> None:
        self.cfg = cfg
        self.cluster = cluster_settings(cfg.executor)
        self.folder = folder

    def run(self, tasks: list[ShardTask], desc: str = "") -> list[int]:
        """Submit groups of shards as one array; returns shard ids that failed after retries."""
        k = self.cfg.executor.slurm_shards_per_task
        groups = [tasks[i : i + k] for i in range(0, len(tasks), k)]
        d = self.cfg.decode
        workers = self.cluster.cpus_per_task or 1  # each task's local pool uses the CPUs it was given

        def group_args(group: list[ShardTask]) -> tuple:
            return group, workers, d.worker_memory_mb, d.item_timeout_s

        def failed_shards(group: list[ShardTask], failed_ids: list[int] | None) -> list[ShardTask] | None:
            # a task that died fails its whole group
            failed = {t.shard for t in group} if failed_ids is None else set(failed_ids)
            return [t for t in group if t.shard in failed] or None

        left = submit_rounds(groups, run_group, group_args, failed_shards, self.cluster, self.folder,
                             max_retries=self.cfg.executor.max_retries, desc=desc, unit="task")
        return sorted(t.shard for group in left for t in group)


class SliceFailure(RuntimeError):
    """Slices of a global stage still failed after `executor.max_retries` retries (nothing is committed)."""


@dataclass(frozen=True)
class SliceTask:
    """One slice of a global stage: `fn(*args, out_path)` computes it and writes `out_path` atomically.

    `fn` and `args` are pickled into a SLURM array task, so `fn` must be a module-level function and `args` should
    name files rather than carry large arrays.
    """

    index: int
    fn: Callable[..., None]
    args: tuple
    out_path: str


def run_slice(task: SliceTask) -> bool:
    """Body of one slice, here or in an array task: skipped when its output exists; True once the output is there."""
    if not Path(task.out_path).is_file():
        task.fn(*task.args, task.out_path)
    return Path(task.out_path).is_file()


def _run_slices_here(tasks: list[SliceTask], max_retries: int, desc: str) -> list[SliceTask]:
    """In-process, one slice after the other (each slice already uses the threads its stage configures). An error
    in the last try propagates with its traceback: in-process, it is the caller's own bug or environment."""
    pending = list(tasks)
    for attempt in range(max_retries + 1):
        failed = []
        for task in tqdm(pending, desc=desc, unit="slice", dynamic_ncols=True, leave=False, disable=len(pending) < 8):
            try:
                if not run_slice(task):
                    failed.append(task)
            except Exception as exc:
                if attempt == max_retries:
                    raise
                log.warning("%s: slice %d failed (%s: %s); retrying", desc, task.index, type(exc).__name__, exc)
                failed.append(task)
        pending = failed
        if not pending:
            break
    return pending


def _run_slices_slurm(tasks: list[SliceTask], cfg: CurateConfig, folder: Path, desc: str) -> list[SliceTask]:
    """One job array of the pending slices per round; a slice whose task died or left no output is resubmitted."""

    def without_output(task: SliceTask, _: bool | None) -> SliceTask | None:
        # however the task ended, its output file decides
        return None if Path(task.out_path).is_file() else task

    return submit_rounds(tasks, run_slice, lambda task: (task,), without_output, cluster_settings(cfg.executor),
                         folder, max_retries=cfg.executor.max_retries, desc=desc, unit="slice")


def run_slices(tasks: list[SliceTask], cfg: CurateConfig, folder: Path, desc: str = "") -> None:
    """Run every slice whose output file is missing, here or (`executor.kind: slurm`) as SLURM job arrays.

    Slices with an output are never redone, so a killed run resumes with the missing slices only.

    Raises:
        SliceFailure: naming the slices (and the log folder) still without output after `executor.max_retries`.
    """
    pending = [t for t in tasks if not Path(t.out_path).is_file()]
    if not pending:
        return
    if cfg.executor.kind == "slurm":
        failed = _run_slices_slurm(pending, cfg, folder, desc)
        where = f"; SLURM logs under {folder}"
    else:
        failed = _run_slices_here(pending, cfg.executor.max_retries, desc)
        where = ""
    if failed:
        raise SliceFailure(f"{desc}: slices {[t.index for t in failed]} failed after "
                           f"{cfg.executor.max_retries} retries{where}; re-run to retry them")


SliceRunner = Callable[[list[SliceTask], str], None]


def run_here(tasks: list[SliceTask], desc: str = "") -> None:
    """The runner of code without a curate config (library calls, benches): in this process, no retries."""
    failed = _run_slices_here([t for t in tasks if not Path(t.out_path).is_file()], 0, desc)
    if failed:
        raise SliceFailure(f"{desc}: slices {[t.index for t in failed]} failed")


def slice_runner(cfg: CurateConfig, folder: Path) -> SliceRunner:
    """`run_slices` bound to a stage's config and submitit folder, for code that does not know the config."""

    def run(tasks: list[SliceTask], desc: str = "") -> None:
        run_slices(tasks, cfg, folder, desc)

    return run


def make_executor(cfg: CurateConfig, folder: Path) -> LocalExecutor | SlurmExecutor:
    """The configured executor."""
    if cfg.executor.kind == "slurm":
        return SlurmExecutor(cfg, folder)
    d = cfg.decode
    return LocalExecutor(cfg.executor.workers, d.worker_memory_mb, d.item_timeout_s, cfg.executor.max_retries)
