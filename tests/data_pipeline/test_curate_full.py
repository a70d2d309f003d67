"""Every curation stage end to end on real photos: hash and copy dedup, decontamination, k-means, retrieval, shards,
report; the trainer trains on the shards; a re-run is a no-op; the CLI runs the whole pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipeline.core.config import load_config
from data_pipeline.curate import STAGE_NAMES, curate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "curate" / "tiny.yaml"
EVAL_PHOTO = "clock"  # a singleton photo of the planted set whose re-encoded copy forms the evaluation set
SEED_PHOTOS = ("coffee", "rocket")  # sample-based seeds: fresh crops of these photos


@pytest.fixture(scope="module")
def full_setup(planted_src, copy_model_path, ssl_model_path, imgtools, tmp_path_factory):
    src, truth = planted_src
    root = tmp_path_factory.mktemp("full")
    photos = imgtools.load_photos()
    eval_dir = root / "eval" / EVAL_PHOTO
    eval_dir.mkdir(parents=True)
    (eval_dir / "held_out.jpg").write_bytes(imgtools.encode(photos[EVAL_PHOTO].convert("RGB"), "JPEG", quality=70))
    seeds = root / "seeds"
    seeds.mkdir()
    for name in SEED_PHOTOS:
        im = photos[name].convert("RGB")
        w, h = im.size
        for k, box in enumerate(((0, 0, w * 3 // 4, h * 3 // 4), (w // 4, h // 4, w, h))):
            (seeds / f"{name}_{k}.jpg").write_bytes(imgtools.encode(im.crop(box), "JPEG", quality=90))
    overrides = [
        f"ingest.sources=[{src}]", "hash.threshold=8",
        f"embed.copy_model={copy_model_path}", f"embed.ssl_model={ssl_model_path}", "embed.ssl_resolution=56",
        "embed.loader_workers=0", "embed.batch_size=8",
        "copy_dedup.threshold=0.9",
        f"decontaminate.eval_sets=[eval={root / 'eval'}]", "decontaminate.threshold=0.9",
        "cluster.n_clusters=4", "cluster.iterations=5",
        f"retrieve.seed_sets=[{{name: fresh, sources: [{seeds}], mode: sample, n_neighbors: 1}},"
        f"{{name: kept, sources: [{seeds}], mode: as_is}}]",
        "shards.max_count=4",
    ]
    out = root / "out"
    results = curate(load_config(TINY, overrides), out)
    return src, truth, root, out, overrides, results


def _manifest(out: Path, stage: str) -> list[dict]:
    return pq.read_table(out / stage / "manifest.parquet").to_pylist()


def test_every_stage_runs_and_commits(full_setup):
    _, _, _, out, _, results = full_setup
    assert [r.name for r in results] == STAGE_NAMES
    assert not any(r.failed_shards for r in results)
    for name in STAGE_NAMES:
        assert (out / name / "_SUCCESS.json").is_file(), name


def test_decontamination_removes_the_evaluation_photo(full_setup):
    _, _, _, out, _, _ = full_setup
    rows = {Path(r["path"]).name: r for r in _manifest(out, "decontaminate")}
    assert rows[f"{EVAL_PHOTO}.png"]["keep"] is False
    assert rows[f"{EVAL_PHOTO}.png"]["contaminated_by"] == "eval"
    others = [r for n, r in rows.items() if not n.startswith(EVAL_PHOTO)]
    assert not any(r["contaminated_by"] for r in others)


def test_hash_and_copy_dedup_keep_one_per_planted_photo(full_setup):
    _, truth, _, out, _, _ = full_setup
    kept = [Path(r["path"]).name for r in _manifest(out, "copy_dedup") if r["keep"]]
    bases = [truth[name][0] for name in kept]
    assert len(bases) == len(set(bases)), "two kept images of the same photo"
    assert set(bases) == {base for base, _ in truth.values()}, "a photo lost all its copies"


def test_shards_hold_exactly_the_selection(full_setup):
    _, _, _, out, _, _ = full_setup
    selected = pq.read_table(out / "retrieve" / "selected.parquet").to_pylist()
    index = json.loads((out / "shards" / "index.json").read_text())
    urls = [str(out / "shards" / s["url"]) for s in index["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["id"] for m in metas) == sorted(r["id"] for r in selected)
    reasons = {m["id"]: {r["mode"] for r in m["reasons"]} for m in metas}
    assert sum("as_is" in v for v in reasons.values()) == 2 * len(SEED_PHOTOS)
    retrieved = {Path(m["path"]).name.split("_")[0].split(".")[0] for m in metas if "sample" in reasons[m["id"]]}
    assert retrieved == set(SEED_PHOTOS)  # each seed's nearest pool image is a copy of its photo
    assert (out / "report" / "report.html").is_file()


def test_trainer_trains_on_the_shards(full_setup, tmp_path, tiny_train):
    _, _, _, out, _, _ = full_setup
    from dinov2.config import load_config as load_train_config
    from dinov2.distributed.env import DistEnv
    from dinov2.train.train import train

    pattern = json.loads((out / "shards" / "index.json").read_text())["pattern"]
    cfg = load_train_config(None, tiny_train(out / "shards" / pattern, 2, tmp_path, "train.batch_size_per_gpu=2"))
    summary = train(cfg, DistEnv(), resume=False)
    assert summary["iteration"] == 1 and all(v == v for v in summary["losses"])
    assert not summary["images_skipped"]


def test_rerun_is_a_noop_and_cli_runs_every_stage(full_setup):
    _, _, _, out, overrides, _ = full_setup
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.curate", "--config", str(TINY), "--output-dir",
                           str(out), *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert all(f"{name}" in proc.stdout for name in STAGE_NAMES)
    assert proc.stdout.count("skipped") == len(STAGE_NAMES)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def _success_markers(out: Path) -> dict[str, bytes]:
    # The report shows each stage's wall time, so its checksums differ between runs; every other stage is exact.
    return {name: (out / name / "_SUCCESS.json").read_bytes() for name in STAGE_NAMES if name != "report"}


def test_killed_at_later_stages_resumes_to_identical_outputs(full_setup, tmp_path):
    """SIGKILL the CLI as the copy-dedup, k-means and shard stages start; each re-run finishes byte-identically."""
    _, _, _, ref_out, overrides, _ = full_setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_pipeline.curate", "--config", str(TINY), "--output-dir", str(out), *overrides]
    for stage in ("copy_dedup", "cluster", "shards"):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while not (out / stage).is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.01)
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "report" / "_SUCCESS.json").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _success_markers(out) == _success_markers(ref_out)
    assert (out / "report" / "_SUCCESS.json").is_file()
    assert (out / "shards" / "index.json").read_bytes() == (ref_out / "shards" / "index.json").read_bytes()
