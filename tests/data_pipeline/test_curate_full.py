"""Every curation stage end to end on real photos: hash and copy dedup, decontamination, k-means, retrieval, shards,
report; the trainer trains on the shards; a re-run is a no-op; the CLI runs the whole pipeline."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipeline.core.config import load_config
from data_pipeline.curate import STAGE_NAMES, curate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "curate" / "tiny.yaml"
EVAL_PHOTO = "clock"  # a singleton photo of the planted set whose re-encoded copy forms the evaluation set
SEED_PHOTOS = ("coffee", "rocket")  # sample-based seeds: fresh crops of these photos
# A 16% crop of "page": 30 pHash bits from the original (no near duplicate) but cosine ~0.96 for the copy descriptor.
COPY_ONLY = "page_crop16.png"


def _extra_source(root: Path, imgtools) -> Path:
    """A second source: a copy only copy detection catches, and files rejected at ingest and at decode."""
    extra = root / "extra"
    extra.mkdir()
    page = imgtools.load_photos(names=("page",))["page"]
    w, h = page.size
    d = int(w * 0.08)
    (extra / COPY_ONLY).write_bytes(imgtools.encode(page.crop((d, d, w - d, h - d)), "PNG"))
    jpg = imgtools.encode(imgtools.load_photos(names=("coins",))["coins"].convert("RGB"), "JPEG", quality=90)
    (extra / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (extra / "empty.jpg").write_bytes(b"")
    (extra / "tiny.png").write_bytes(imgtools.encode(page.resize((8, 8)), "PNG"))
    with tarfile.open(extra / "pack.tar", "w") as tf:
        for name in ("../escape.jpg", "/abs.jpg"):  # rejected at listing time (ingest)
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
    return extra


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
    extra = _extra_source(root, imgtools)
    truth = {**truth, COPY_ONLY: ("page", "crop16")}
    overrides = [
        f"ingest.sources=[{src},{extra}]", "hash.threshold=8",
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


def _shard_samples(out: Path) -> list[dict]:
    """Every sample of the curated shards, in shard order (the shards' index.json lists the tars)."""
    index = json.loads((out / "shards" / "index.json").read_text())
    urls = [str(out / "shards" / s["url"]) for s in index["shardlist"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_shards_hold_exactly_the_selection(full_setup):
    _, _, _, out, _, _ = full_setup
    selected = pq.read_table(out / "retrieve" / "selected.parquet").to_pylist()
    samples = _shard_samples(out)
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["id"] for m in metas) == sorted(r["id"] for r in selected)
    reasons = {m["id"]: {r["mode"] for r in m["reasons"]} for m in metas}
    assert sum("as_is" in v for v in reasons.values()) == 2 * len(SEED_PHOTOS)
    retrieved = {Path(m["path"]).name.split("_")[0].split(".")[0] for m in metas if "sample" in reasons[m["id"]]}
    assert retrieved == set(SEED_PHOTOS)  # each seed's nearest pool image is a copy of its photo
    assert (out / "report" / "report.html").is_file()


def _shard_stream(out: Path) -> list[tuple]:
    """Each sample in shard order, named by file name (ids and paths name the location), with its image bytes."""
    stream = []
    for sample in _shard_samples(out):
        meta = json.loads(sample["json"])
        image = next(v for k, v in sample.items() if k in ("jpg", "png", "webp"))
        stream.append((Path(meta["path"]).name, meta["member"], meta["sha256"], meta["cluster"],
                       sorted((r["seed_set"], r["mode"]) for r in meta["reasons"]), image))
    return stream


def test_same_crawl_at_another_path_gives_the_same_shards(full_setup, tmp_path):
    """Sources, seeds and evaluation set moved elsewhere: every decision and the shard stream are the same (ids hash
    the source's path, so nothing may order or break ties by id)."""
    src, _, root, out, overrides, _ = full_setup
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved / "crawl")
    for name in ("eval", "seeds", "extra"):
        shutil.copytree(root / name, moved / name)
    moved_overrides = [o.replace(str(src), str(moved / "crawl")).replace(str(root), str(moved)) for o in overrides]
    assert moved_overrides != overrides
    moved_out = moved / "out"
    curate(load_config(TINY, moved_overrides), moved_out)

    def decisions(where: Path) -> list[tuple]:
        return [(Path(r["path"]).name, r["member"], r["keep"], r["dup_kind"], r.get("contaminated_by"))
                for r in _manifest(where, "decontaminate")]

    assert decisions(moved_out) == decisions(out)
    here, there = _shard_stream(out), _shard_stream(moved_out)
    assert len(here) > 2 * len(SEED_PHOTOS) and there == here


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
    # .lock is the ownership record every run writes (its pid and start time), not an output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.curate", "--config", str(TINY), "--output-dir",
                           str(out), *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert all(f"{name}" in proc.stdout for name in STAGE_NAMES)
    assert proc.stdout.count("skipped") == len(STAGE_NAMES)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
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


CHAIN = ("ingest", "decode", "exact_dedup", "near_dedup", "copy_dedup", "decontaminate")


def test_report_numbers_match_the_manifests(full_setup):
    """Rejects, every dedup kind and decontamination: each number of report.json recomputed from the manifests."""
    _, _, _, out, _, _ = full_setup
    rep = json.loads((out / "report" / "report.json").read_text())
    man = {s: _manifest(out, s) for s in CHAIN}
    final = man["decontaminate"]
    removed = Counter(r["dup_kind"] for r in final if r["status"] == "ok" and not r["keep"])
    assert {"exact_bytes", "exact_pixels", "near", "copy", "contaminated"} <= set(removed), removed
    assert rep["dup_kinds"] == {"from": "decontaminate", **removed}
    copy_only = next(r for r in final if Path(r["path"]).name == COPY_ONLY)
    assert copy_only["dup_kind"] == "copy" and Path(next(r["path"] for r in final if r["id"] == copy_only[
        "dup_of"])).name == "page.png"
    stages = {s["stage"]: s for s in rep["stages"]}
    prev = None
    for name in CHAIN:
        rows = man[name]
        ok = [r["status"] == "ok" for r in rows]
        kept = [o and r.get("keep", True) for o, r in zip(ok, rows)]
        new_rejects = Counter(r["reject_reason"] for k, r in enumerate(rows)
                              if not ok[k] and (prev is None or prev[0][k]))
        new_removed = Counter(r["dup_kind"] for k, r in enumerate(rows)
                              if prev and prev[1][k] and not kept[k] and ok[k])
        assert stages[name]["outputs"] == sum(kept), name
        assert stages[name]["inputs"] == (len(rows) if prev is None else sum(prev[1])), name
        assert stages[name]["rejects"] == dict(new_rejects) == rep["rejects"].get(name, {}), name
        assert stages[name]["removed"] == dict(new_removed) == rep["removed"].get(name, {}), name
        prev = (ok, kept)
    # Rejects are counted once, at the stage that made them: ingest (unsafe tar members), decode (the rest).
    assert set(rep["rejects"]["ingest"]) == {"tar_path_traversal", "tar_absolute_path"}
    assert set(rep["rejects"]["decode"]) == {"truncated", "empty_file", "too_small"}
    every = Counter(r["reject_reason"] for r in final if r["status"] != "ok")
    assert sum((Counter(rep["rejects"][s]) for s in ("ingest", "decode")), Counter()) == every
    assert not any(rep["rejects"].get(s) for s in CHAIN[2:])
    # Decontamination: removed at that stage vs touched rows already removed earlier.
    decon = {}
    for r in final:
        if r["contaminated_by"]:
            entry = decon.setdefault(r["contaminated_by"], {"removed_here": 0, "already_removed": 0})
            entry["removed_here" if r["dup_kind"] == "contaminated" else "already_removed"] += 1
    assert rep["decontamination"] == decon and decon["eval"]["removed_here"] >= 1
    assert rep["decontamination"]["eval"]["removed_here"] == stages["decontaminate"]["counts"]["removed"][
        "contaminated"]
    comp = Counter(r["copy_component"] for r in man["copy_dedup"] if r["copy_component"] >= 0)
    assert rep["copy_components"] == {str(k): v for k, v in sorted(Counter(comp.values()).items())}
    # Groups to audit, both levels: every shown member is within the threshold of the image it was removed for.
    groups = rep["audit_groups"]
    near_rows, copy_rows = man["near_dedup"], man["copy_dedup"]
    row_of = {r["id"]: k for k, r in enumerate(near_rows)}
    for g in groups["near_dedup"]["largest"] + groups["near_dedup"]["loosest"]:
        for row, kind, dist in g["members"]:
            target = near_rows[row_of[near_rows[row]["dup_of"]]]
            bits = int(np.unpackbits(np.array([near_rows[row]["phash"] ^ target["phash"]], np.uint64).view(
                np.uint8)).sum())
            assert near_rows[row]["dup_group"] == g["kept"]
            assert (dist == bits and bits <= 8) if kind == "near" else dist == 0  # exact copies are not hashed
    loosest_bits = [g["loosest"] for g in groups["near_dedup"]["loosest"]]
    assert loosest_bits == sorted(loosest_bits, reverse=True) and loosest_bits[0] > 0
    sizes = [g["size"] for g in groups["near_dedup"]["largest"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 7  # a planted base: 8 files, 1 kept
    copy_groups = groups["copy_dedup"]["largest"]
    assert any(row == row_of[copy_only["id"]] for g in copy_groups for row, _, _ in g["members"])
    for g in copy_groups:
        for row, kind, sim in g["members"]:
            assert kind == "copy" and sim > 0.9 and copy_rows[row]["dup_group"] == g["kept"]
    assert rep["audit_bands"] == {"copy_dedup": [0.85, 0.9, 0.95], "decontaminate": [0.85, 0.9, 0.95]}
    page = (out / "report" / "report.html").read_text()
    assert "0.850 &lt; cos &lt;= 0.950 around the threshold 0.900" in page
    assert "already removed by an earlier stage" in page


def test_demo_former_rule_comparison_reads_a_curated_output(full_setup):
    """make demo's dedup table rebuilds the former connected-components rule from the stage artifacts: at the pHash
    level (same edges) components remove at least what chain-free groups remove, and both keep a kept row."""
    from demo.dedup_eval import former_rule, pipeline_rule

    _, _, _, out, _, _ = full_setup
    former, pipeline = former_rule(out, copy_k=8, copy_threshold=0.9), pipeline_rule(out)
    n = len(_manifest(out, "exact_dedup"))
    for stage in ("exact_dedup", "near_dedup", "copy_dedup"):
        for kept_of in (former[stage], pipeline[stage]):
            assert kept_of.shape == (n,) and (kept_of[kept_of] == kept_of).all(), stage  # maps to a kept row
    assert (former["exact_dedup"] == pipeline["exact_dedup"]).all()
    removed = {name: int((rule["near_dedup"] != np.arange(n)).sum()) for name, rule in
               (("former", former), ("pipeline", pipeline))}
    assert removed["former"] >= removed["pipeline"] > 0
