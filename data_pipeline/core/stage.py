"""Stage framework: a stage = name, input stages, output artifacts, a per-shard and/or a whole-table function."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, section_dict
from data_pipeline.core.executors import ShardTask, make_executor


@dataclass
class StageContext:
    """What a stage may look at: the config and the output root."""

    cfg: CurateConfig
    output_dir: Path

    def stage_dir(self, name: str) -> Path:
        """Directory holding stage `name`'s artifacts."""
        return self.output_dir / name

    def require(self, name: str) -> Path:
        """Directory of a finished upstream stage; ValueError if that stage has not completed."""
        d = self.stage_dir(name)
        if artifacts.read_success(d) is None:
            raise ValueError(f"stage '{name}' has not completed in {self.output_dir}; run it first")
        return d


@dataclass(frozen=True)
class Stage:
    """One curation step.

    Attributes:
        name: stage name, also its directory under the output dir.
        inputs: upstream stage names whose artifacts `plan` reads.
        outputs: file names `finish` writes into the stage dir (checksummed in `_SUCCESS.json`).
        config_sections: config sections that change this stage's result (part of its fingerprint).
        plan: whole-table function returning the rows to process, in row_id order.
        finish: whole-table function `(ctx, table) -> counts` that writes `outputs`; `table` is the concatenation of
            the shard results in order (or the plan itself when there is no per-shard function).
        map_shard: optional module-level per-shard function `(cfg, rows) -> rows`, run by the executor.
        reject_item: optional `(rows, reason) -> rows` giving the result for an item whose worker died or hung.
        rules: revision of the stage's decision rules, raised when the same inputs would now give other outputs, so
            that an output directory written by an earlier version is redone rather than skipped (0 adds nothing to
            the fingerprint).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_sections: tuple[str, ...]
    plan: Callable[[StageContext], pa.Table]
    finish: Callable[[StageContext, pa.Table], dict]
    map_shard: Callable[[CurateConfig, pa.Table], pa.Table] | None = None
    reject_item: Callable[[pa.Table, str], pa.Table] | None = None
    rules: int = 0


@dataclass
class StageResult:
    """Outcome of `run_stage`."""

    name: str
    skipped: bool
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    failed_shards: list[int] = field(default_factory=list)


def _table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def _run_shards(stage: Stage, ctx: StageContext, plan: pa.Table, stage_dir: Path) -> tuple[pa.Table, list[int]]:
    size = ctx.cfg.ingest.shard_size
    n_shards = max(1, -(-plan.num_rows // size))
    tasks = []
    for s in range(n_shards):
        out = artifacts.part_path(stage_dir, s)
        if not out.is_file():
            rows = plan.slice(s * size, size)
            tasks.append(ShardTask(stage.name, s, stage.map_shard, stage.reject_item, ctx.cfg, rows, str(out)))
    failed: list[int] = []
    if tasks:
        executor = make_executor(ctx.cfg, ctx.output_dir / "_executor" / stage.name)
        failed = executor.run(tasks, desc=stage.name)
    if failed:
        return plan.slice(0, 0), failed
    parts = [artifacts.read_table(artifacts.part_path(stage_dir, s)) for s in range(n_shards)]
    return pa.concat_tables(parts), []


def run_stage(stage: Stage, ctx: StageContext) -> StageResult:
    """Run one stage unless its committed output matches the current input and config.

    Returns:
        A StageResult; `failed_shards` is non-empty when shards still failed after retries (nothing committed).
    """
    t0 = time.perf_counter()
    for name in stage.inputs:
        ctx.require(name)
    plan = stage.plan(ctx)
    identity: dict = {"stage": stage.name, "config": section_dict(ctx.cfg, *stage.config_sections),
                      "plan": _table_digest(plan)}
    if stage.rules:  # absent at 0, so the fingerprints of stages never revised stay what they were
        identity["rules"] = stage.rules
    fingerprint = artifacts.digest(identity)
    stage_dir = ctx.stage_dir(stage.name)
    marker = artifacts.read_success(stage_dir)
    if marker is not None and marker.get("fingerprint") == fingerprint:
        return StageResult(stage.name, True, marker["counts"], time.perf_counter() - t0)
    artifacts.prepare_stage_dir(stage_dir, fingerprint)
    table = plan
    if stage.map_shard is not None:
        table, failed = _run_shards(stage, ctx, plan, stage_dir)
        if failed:
            return StageResult(stage.name, False, {}, time.perf_counter() - t0, failed)
    if stage.map_shard is None:
        with tqdm(total=table.num_rows, desc=stage.name, unit="img", dynamic_ncols=True) as bar:
            counts = stage.finish(ctx, table)
            bar.update(table.num_rows)
    else:
        counts = stage.finish(ctx, table)
    seconds = time.perf_counter() - t0
    # stats.json carries wall time, so it lives outside the checksummed outputs.
    artifacts.write_json_atomic(stage_dir / "stats.json", {**counts, "seconds": round(seconds, 3)})
    artifacts.commit_stage(stage_dir, fingerprint, list(stage.outputs), counts)
    return StageResult(stage.name, False, counts, seconds)


def reject_counts(table: pa.Table) -> dict[str, int]:
    """Rejects by reason from a manifest's `reject_reason` column (sorted by reason)."""
    if "reject_reason" not in table.column_names:
        return {}
    out: dict[str, int] = {}
    for reason in table.column("reject_reason").to_pylist():
        if reason:
            out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))
