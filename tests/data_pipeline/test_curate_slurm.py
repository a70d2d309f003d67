"""The SLURM executor (submitit job array on the single-node test cluster) gives byte-identical outputs to local."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.core.config import load_config
from data_pipeline.core.executors import cluster_settings
from data_pipeline.curate import curate
from dinov2.run.slurm import executor_parameters

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "curate" / "tiny.yaml"
OUTPUTS = ("ingest/manifest.parquet", "decode/manifest.parquet", "exact_dedup/manifest.parquet", "phash/phash.npy",
           "phash/phash_flags.npy", "near_dedup/manifest.parquet", "near_dedup/edges.parquet")


def test_cluster_settings_from_yamls_then_partition_override(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("partition: big\naccount: lab\n")
    array = tmp_path / "array.yaml"
    array.write_text("cpus_per_task: 3\narray_parallelism: 5\n")
    cfg = load_config(TINY, [f"executor.slurm_files=[{site},{array}]"])
    cluster = cluster_settings(cfg.executor)
    assert (cluster.partition, cluster.account, cluster.cpus_per_task, cluster.mem_gb) == ("big", "lab", 3, None)
    assert executor_parameters(cluster)["slurm_array_parallelism"] == 5
    cfg = load_config(TINY, [f"executor.slurm_files=[{site}]", "executor.slurm_partition=debug"])
    assert cluster_settings(cfg.executor).partition == "debug"
    array.write_text("partitoin: big\n")
    with pytest.raises(ValueError, match="partitoin"):
        cluster_settings(load_config(TINY, [f"executor.slurm_files=[{array}]"]).executor)


def test_shipped_array_yaml_is_the_default_and_loads():
    assert load_config(TINY).executor.slurm_files == ["slurm/curate_array.yaml"]
    shipped = REPO / "slurm" / "curate_array.yaml"
    cluster = cluster_settings(load_config(TINY, [f"executor.slurm_files=[{shipped}]"]).executor)
    assert cluster.array_parallelism and cluster.cpus_per_task == 1 and cluster.ntasks_per_node == 1


@pytest.mark.slurm
def test_slurm_and_local_outputs_byte_identical(slurm_cluster, planted_src, tmp_path):
    src, _ = planted_src
    common = [f"ingest.sources=[{src}]", "hash.threshold=8", "ingest.shard_size=16"]
    hash_stages = ["ingest", "decode", "exact_dedup", "phash", "near_dedup"]
    local = curate(load_config(TINY, common), tmp_path / "local", hash_stages)
    array = tmp_path / "array.yaml"
    array.write_text("cpus_per_task: 1\nmem_gb: 2\ntimeout_min: 10\n")
    slurm_overrides = [
        "executor.kind=slurm",
        f"executor.slurm_files=[{array}]",
        f"executor.slurm_partition={slurm_cluster.partition}",
        "executor.slurm_shards_per_task=2",
    ]
    slurm = curate(load_config(TINY, common + slurm_overrides), tmp_path / "slurm", hash_stages)
    assert not any(r.failed_shards for r in local + slurm)
    assert not any(r.skipped for r in slurm)
    # The submitit folders hold the per-task logs: proof the shards really ran as SLURM array tasks.
    assert list((tmp_path / "slurm" / "_executor" / "decode").rglob("*_log.out"))
    for name in OUTPUTS:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "slurm" / name).read_bytes(), name
