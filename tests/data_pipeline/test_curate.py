"""End-to-end curation on planted duplicates and the hostile corpus; idempotent re-run; kill-and-resume; CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline.core.config import load_config
from data_pipeline.curate import STAGE_NAMES, curate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "curate" / "tiny.yaml"
# pHash moves a few bits under a 2% crop (up to 8 on these photos); distinct photos here are >= 20 apart.
PLANTED_THRESHOLD = 8
# The model-free stages; the embedding stages and later have their own end-to-end test (test_curate_full.py).
HASH_STAGES = ["ingest", "decode", "exact_dedup", "phash", "near_dedup"]
OUTPUTS = {"ingest": ["manifest.parquet"], "decode": ["manifest.parquet"], "exact_dedup": ["manifest.parquet"],
           "phash": ["phash.npy", "phash_flags.npy"], "near_dedup": ["manifest.parquet", "edges.parquet"]}


def _cfg(src: Path, *extra: str):
    return load_config(TINY, [f"ingest.sources=[{src}]", f"hash.threshold={PLANTED_THRESHOLD}", *extra])


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "near_dedup" / "manifest.parquet").to_pylist()


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    # .lock is the ownership record every run writes (its pid and start time), not an output
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")
            if p.name != ".lock"}


def _output_bytes(out: Path) -> dict[str, bytes]:
    files = {f"{s}/{f}": (out / s / f).read_bytes() for s, names in OUTPUTS.items() for f in names}
    files.update({f"{s}/_SUCCESS.json": (out / s / "_SUCCESS.json").read_bytes() for s in OUTPUTS})
    return files


@pytest.fixture(scope="module")
def planted_run(planted_src, tmp_path_factory):
    src, truth = planted_src
    out = tmp_path_factory.mktemp("planted_out")
    results = curate(_cfg(src), out, HASH_STAGES)
    return src, truth, out, results


def test_planted_exact_and_near_recall_no_false_merges(planted_run):
    _, truth, out, results = planted_run
    assert STAGE_NAMES[:5] == HASH_STAGES
    assert [r.name for r in results] == HASH_STAGES and not any(r.failed_shards for r in results)
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert set(rows) == set(truth) and all(r["status"] == "ok" for r in rows.values())
    groups = defaultdict(set)
    for name, (base, _) in truth.items():
        groups[base].add(rows[name]["dup_group"])
    # Recall = 1: every variant of a base lands in that base's single group ...
    assert all(len(g) == 1 for g in groups.values()), groups
    # ... and no false merges: distinct bases never share a group.
    assert len({next(iter(g)) for g in groups.values()}) == len(groups)
    by_id = {r["id"]: r for r in rows.values()}
    for base in groups:
        members = [n for n, (b, _) in truth.items() if b == base]
        kept = [n for n in members if rows[n]["keep"]]
        assert len(kept) == 1
        # Representative rule: largest resolution wins (the 1.5x upscale where present).
        assert kept[0] == (f"{base}_up.png" if len(members) > 1 else f"{base}.png")
        for n in members:
            if n != kept[0]:
                # dup_of names the image it was removed in favour of: the kept one for a near duplicate, its exact
                # group's representative (itself removed as a near duplicate) for an exact copy.
                target = by_id[rows[n]["dup_of"]]
                assert truth[Path(target["path"]).name][0] == base
                assert target is rows[kept[0]] or rows[n]["dup_kind"].startswith("exact")
    # Exact stage: orig, byte copy and pixel copy form one exact group per base; nothing else joins it.
    exact = {Path(r["path"]).name: r for r in pq.read_table(out / "exact_dedup" / "manifest.parquet").to_pylist()}
    exact_groups = defaultdict(set)
    for name, (base, variant) in truth.items():
        exact_groups[(base, variant in ("orig", "bytes", "pixels"))].add(exact[name]["dup_group"])
    for (base, is_exact), g in exact_groups.items():
        if is_exact:
            assert len(g) == 1 and sum(exact[f"{base}{s}"]["keep"] for s in (".png", "_copy.png", "_pix.png")
                                       if f"{base}{s}" in exact) == 1
        else:
            assert len(g) == len([1 for b, v in truth.values() if b == base and v not in ("orig", "bytes", "pixels")])
    kinds = {v: {rows[n]["dup_kind"] for n, (_, vv) in truth.items() if vv == v} for _, v in truth.values()}
    assert kinds["jpeg50"] == kinds["half"] == kinds["crop"] == kinds["webp"] == {"near"}
    for stage in HASH_STAGES:
        stats = json.loads((out / stage / "stats.json").read_text())
        assert {"inputs", "outputs", "rejects", "seconds"} <= set(stats), stage
        assert json.loads((out / stage / "_SUCCESS.json").read_text())["versions"]["pillow"]
    assert sum(json.loads((out / "exact_dedup" / "stats.json").read_text())["removed"].values()) == 2 * 6


def _decisions(out: Path, src: Path) -> dict[str, tuple]:
    """Each stage's decisions per file, named by its path under the source (ids hash the source's own path)."""
    rows = {}
    for stage in ("exact_dedup", "near_dedup"):
        table = pq.read_table(out / stage / "manifest.parquet").to_pylist()
        name_of = {r["id"]: str(Path(r["path"]).relative_to(src)) for r in table}
        for r in table:
            rows[(stage, name_of[r["id"]])] = (r["keep"], r["dup_kind"], r["dup_group"], name_of.get(r["dup_of"]),
                                               r.get("phash"))
    return rows


def test_same_crawl_at_another_path_curates_the_same(planted_run, planted_copy, tmp_path):
    # Ties in the representative order (an exact copy has its original's size) go to the listing position, not to
    # the id, which hashes the source's path: a crawl moved or mounted elsewhere must keep the same images.
    src, _, out, _ = planted_run
    moved, _ = planted_copy
    moved_out = tmp_path / "moved_out"
    curate(_cfg(moved), moved_out, HASH_STAGES)
    here, there = _decisions(out, src), _decisions(moved_out, moved)
    assert len(here) == 2 * 54
    assert there == here
    assert {r["id"] for r in _rows(out)}.isdisjoint(r["id"] for r in _rows(moved_out))  # ids differ, decisions not


def test_rerun_writes_nothing(planted_run):
    src, _, out, _ = planted_run
    before = _snapshot(out)
    results = curate(_cfg(src), out, HASH_STAGES)
    assert all(r.skipped for r in results)
    assert _snapshot(out) == before


def test_file_rewritten_in_place_with_same_size_is_reingested(planted_src, tmp_path):
    src, _ = planted_src
    local = tmp_path / "src"
    local.mkdir()
    names = sorted(p.name for p in src.iterdir() if p.suffix == ".png")[:3]
    for name in names:
        (local / name).write_bytes((src / name).read_bytes())
    out = tmp_path / "out"
    curate(_cfg(local), out, ["ingest"])
    victim = local / names[0]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size, different bytes (inside the final IEND/IDAT tail)
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    results = curate(_cfg(local), out, ["ingest"])
    assert not results[0].skipped
    rows = {Path(r["path"]).name: r for r in pq.read_table(out / "ingest" / "manifest.parquet").to_pylist()}
    assert rows[names[0]]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()
    assert "mtime_ns" not in pq.read_table(out / "ingest" / "manifest.parquet").column_names


def test_config_change_reruns_only_affected_stages(planted_src, tmp_path):
    src, _ = planted_src
    curate(_cfg(src), tmp_path, HASH_STAGES)
    results = curate(_cfg(src, "hash.threshold=0"), tmp_path, HASH_STAGES)
    skipped = {r.name for r in results if r.skipped}
    assert skipped == {"ingest", "decode", "exact_dedup"}
    near = sum(r["dup_kind"] == "near" for r in _rows(tmp_path))
    assert 0 < near < 24  # threshold 0 still merges identical hashes, but not the 24 planted near-dups


def test_malformed_corpus_decoded_or_rejected_with_reason(malformed_src, tmp_path):
    src, expected = malformed_src
    results = curate(_cfg(src), tmp_path, HASH_STAGES)
    assert not any(r.failed_shards for r in results)
    rows = {}
    for r in pq.read_table(tmp_path / "decode" / "manifest.parquet").to_pylist():
        key = f"hostile.tar::{r['member']}" if r["member"] else Path(r["path"]).name
        rows[key] = r
    assert set(rows) == set(expected)
    for key, reason in expected.items():
        assert rows[key]["reject_reason"] == reason, key
        assert rows[key]["status"] == ("rejected" if reason else "ok"), key
    stats = (tmp_path / "decode" / "stats.json").read_text()
    assert '"decompression_bomb": 1' in stats and '"truncated": 1' in stats


def _cli(out: Path, src: Path, *extra: str, env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "data_pipeline.curate", "--config", str(TINY), "--output-dir", str(out),
           f"ingest.sources=[{src}]", f"hash.threshold={PLANTED_THRESHOLD}", *extra]
    if "--stages" not in extra:
        cmd += ["--stages", ",".join(HASH_STAGES)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_kill_and_resume_gives_identical_outputs(planted_run, tmp_path):
    src, _, ref_out, _ = planted_run
    out = tmp_path / "out"
    proc = _cli(out, src, "executor.workers=1", env={"DATA_PIPELINE_SHARD_SLEEP_S": "0.3"}, start_new_session=True)
    parts = out / "decode" / "parts"
    deadline = time.monotonic() + 60
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers, mid-way through the decode stage
    proc.wait()
    assert not (out / "decode" / "_SUCCESS.json").exists()
    done_before = {p.name for p in parts.glob("part-*.parquet")}
    assert 0 < len(done_before) < 7  # 54 images in shards of 8
    resumed = _cli(out, src)
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert _output_bytes(out) == _output_bytes(ref_out)
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == 54


def test_cli_modules_load_without_torch():
    """Curation workers re-import the CLI's modules under an address-space cap that a CUDA build of torch exceeds:
    torch loads only inside the stages that need it (embedding, the kNN re-rank)."""
    code = "import sys, data_pipeline.curate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_cli_config_errors_are_one_line(planted_src, tmp_path):
    src, _ = planted_src
    for bad, key in (("hash.treshold=3", "hash.treshold"), ("hash.threshold=abc", "hash.threshold"),
                     ("executor.kind=mpi", "executor.kind")):
        proc = _cli(tmp_path, src, bad)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and key in err and "Traceback" not in err
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.curate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and all(s in proc.stdout for s in STAGE_NAMES)
    assert "hash.threshold=4" in proc.stdout and "executor.kind='local'" in proc.stdout


def test_cli_stage_subset_and_resolved_config(planted_src, tmp_path):
    src, _ = planted_src
    proc = _cli(tmp_path, src, "--stages", "ingest,decode")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "decode" / "_SUCCESS.json").is_file() and not (tmp_path / "exact_dedup").exists()
    assert "decode" in out and "exact_dedup" not in out
    assert f"threshold: {PLANTED_THRESHOLD}" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").hash.threshold == PLANTED_THRESHOLD


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(REPO / "configs" / "curate" / "default.yaml") == load_config()
