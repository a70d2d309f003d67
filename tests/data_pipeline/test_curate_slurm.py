"""The SLURM executor (submitit job array on the single-node test cluster) gives byte-identical outputs to local."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.core.config import load_config
from data_pipeline.core.executors import slurm_parameters
from data_pipeline.curate import curate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "curate" / "tiny.yaml"
OUTPUTS = ("ingest/manifest.parquet", "decode/manifest.parquet", "exact_dedup/manifest.parquet", "phash/phash.npy",
           "phash/phash_flags.npy", "near_dedup/manifest.parquet", "near_dedup/edges.parquet")


def test_slurm_parameters_from_yaml_then_partition_override(tmp_path):
    y = tmp_path / "array.yaml"
    y.write_text("partition: big\ncpus_per_task: 3\nshards_per_task: 5\n")
    cfg = load_config(TINY, [f"executor.slurm_config={y}"])
    p = slurm_parameters(cfg)
    assert (p["partition"], p["cpus_per_task"], p["shards_per_task"], p["mem_gb"]) == ("big", 3, 5, 8)
    cfg = load_config(TINY, [f"executor.slurm_config={y}", "executor.slurm_partition=debug"])
    assert slurm_parameters(cfg)["partition"] == "debug"
    y.write_text("partitoin: big\n")
    with pytest.raises(ValueError, match="partitoin"):
        slurm_parameters(load_config(TINY, [f"executor.slurm_config={y}"]))


@pytest.mark.slurm
def test_slurm_and_local_outputs_byte_identical(slurm_cluster, planted_src, tmp_path):
    src, _ = planted_src
    common = [f"ingest.sources=[{src}]", "hash.threshold=8", "ingest.shard_size=16"]
    hash_stages = ["ingest", "decode", "exact_dedup", "phash", "near_dedup"]
    local = curate(load_config(TINY, common), tmp_path / "local", hash_stages)
    slurm_overrides = [
        "executor.kind=slurm",
        "executor.slurm_config=''",
        f"executor.slurm_partition={slurm_cluster.partition}",
        "executor.slurm_cpus_per_task=1",
        "executor.slurm_mem_gb=2",
        "executor.slurm_shards_per_task=2",
        "executor.slurm_timeout_min=10",
    ]
    slurm = curate(load_config(TINY, common + slurm_overrides), tmp_path / "slurm", hash_stages)
    assert not any(r.failed_shards for r in local + slurm)
    assert not any(r.skipped for r in slurm)
    # The submitit folders hold the per-task logs: proof the shards really ran as SLURM array tasks.
    assert list((tmp_path / "slurm" / "_executor" / "decode").rglob("*_log.out"))
    for name in OUTPUTS:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "slurm" / name).read_bytes(), name
