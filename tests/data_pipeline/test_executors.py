"""Executor isolation: a worker that dies (or hangs) costs one item, rejected with a reason, never the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER_MODULE = textwrap.dedent(
    """
    import os, time
    import pyarrow as pa

    SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("reject_reason", pa.string())])

    def work(cfg, rows):
        out = []
        for r in rows.to_pylist():
            if r["id"] == "crash":
                os._exit(3)  # what a segfaulting decoder looks like to the pool
            if r["id"] == "hang":
                time.sleep(600)
            if r["id"] == "hog":
                bytearray(3 << 30)  # 3 GiB under a 1 GiB RLIMIT_AS
            out.append({"id": r["id"], "status": "ok", "reject_reason": ""})
        return pa.Table.from_pylist(out, schema=SCHEMA)

    def reject(rows, reason):
        return pa.Table.from_pylist(
            [{"id": r["id"], "status": "rejected", "reject_reason": reason} for r in rows.to_pylist()], schema=SCHEMA)
    """
)

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import pyarrow as pa, pyarrow.parquet as pq
    import crashmod
    from data_pipeline.core.config import CurateConfig
    from data_pipeline.core.executors import LocalExecutor, ShardTask

    if __name__ == "__main__":
        out, shards = Path(sys.argv[1]), json.loads(sys.argv[2])
        tasks = [ShardTask("t", k, crashmod.work, crashmod.reject, CurateConfig(),
                           pa.table({"id": ids}), str(out / f"part-{k}.parquet")) for k, ids in enumerate(shards)]
        failed = LocalExecutor(2, 1024, float(sys.argv[3]), max_retries=1).run(tasks)
        rows = [r for k in range(len(shards)) if (out / f"part-{k}.parquet").exists()
                for r in pq.read_table(out / f"part-{k}.parquet").to_pylist()]
        print(json.dumps({"failed": failed, "rows": rows}))
    """
)


def _run(tmp_path, shards, item_timeout=2.0):
    (tmp_path / "crashmod.py").write_text(WORKER_MODULE)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), json.dumps(shards),
                           str(item_timeout)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_crashing_and_memory_hogging_items_are_isolated(tmp_path):
    shards = [["a", "b", "c"], ["d", "crash", "e"], ["f", "hog", "g"]]
    res = _run(tmp_path, shards)
    assert res["failed"] == []
    by_id = {r["id"]: r for r in res["rows"]}
    assert sorted(by_id) == sorted(i for s in shards for i in s)  # nothing lost, nothing duplicated
    assert len(res["rows"]) == 9
    assert by_id["crash"]["reject_reason"] == "worker_crashed"
    assert by_id["hog"]["reject_reason"] == "error:MemoryError"  # RLIMIT_AS turned the hog into an error
    assert all(by_id[i]["status"] == "ok" for i in "abcdefg")


def test_environmental_failure_fails_the_shard_instead_of_rejecting_everything(tmp_path):
    res = _run(tmp_path, [["a"], ["crash", "crash"]])
    assert res["failed"] == [1]
    assert [r["id"] for r in res["rows"]] == ["a"]


@pytest.mark.slow
def test_hanging_item_is_killed_and_rejected(tmp_path):
    res = _run(tmp_path, [["a", "hang", "b"]], item_timeout=1.0)
    by_id = {r["id"]: r for r in res["rows"]}
    assert res["failed"] == [] and by_id["hang"]["reject_reason"] == "worker_timeout"
    assert by_id["a"]["status"] == by_id["b"]["status"] == "ok"


class _Job:
    """A finished submitit job: returns `value`, or raises it as a task that died would."""

    def __init__(self, value):
        self.value = value

    def result(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_slurm_rounds_resubmit_only_the_failed_shards_of_each_group(tmp_path, monkeypatch):
    from data_pipeline.core import executors
    from data_pipeline.core.config import CurateConfig

    # shard ids each group's task reports failed, per round (keyed by the group's shards); an exception = task died
    script = [{(0, 1): [1], (2, 3): RuntimeError("node failure"), (4,): []}, {(1,): [], (2, 3): [3]}]
    rounds = []

    def fake_submit(fn, calls, cluster, folder):
        groups = [tuple(t.shard for t in call[0]) for call in calls]
        rounds.append((groups, folder))
        return [_Job(script[len(rounds) - 1][g]) for g in groups]

    monkeypatch.setattr(executors, "submit_array", fake_submit)
    cfg = CurateConfig()
    cfg.executor.slurm_shards_per_task, cfg.executor.max_retries = 2, 1
    tasks = [executors.ShardTask("t", k, None, None, cfg, None, "") for k in range(5)]
    failed = executors.SlurmExecutor(cfg, tmp_path).run(tasks)
    assert [groups for groups, _ in rounds] == [[(0, 1), (2, 3), (4,)], [(1,), (2, 3)]]
    assert failed == [3]
    # one fresh log folder per submission, both under the stage's folder
    assert rounds[0][1] != rounds[1][1] and {folder.parent for _, folder in rounds} == {tmp_path}
