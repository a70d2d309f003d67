"""Shards (WebDataset tars of the selection) and the HTML report, on a synthetic but real-file upstream."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_pipeline.core import artifacts
from data_pipeline.core.config import load_config
from data_pipeline.core.stage import StageContext, run_stage
from data_pipeline.output import report, shards

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "clock", "retina")
FORMATS = ("PNG", "JPEG", "WEBP")
WEIRD_ID = "seed.set/img.01 x"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _commit(stage_dir: Path, outputs: list[str], counts: dict) -> None:
    artifacts.write_json_atomic(stage_dir / "stats.json", {**counts, "seconds": 0.1})
    artifacts.commit_stage(stage_dir, "synthetic-" + stage_dir.name, outputs, counts)


def _build_upstream(root: Path, imgtools, with_cluster: bool = True, with_retrieval: bool = True) -> dict:
    """Image folder + a source tar, near_dedup manifest with dup groups, selected.parquet, stats of a few stages."""
    src = root / "src"
    src.mkdir(parents=True)
    photos = imgtools.load_photos(side=96, names=NAMES)
    rows = []
    for k, (name, im) in enumerate(photos.items()):
        fmt = FORMATS[k % 3]
        data = imgtools.encode(im.convert("RGB"), fmt, quality=90) if fmt != "PNG" else imgtools.encode(im, "PNG")
        path = src / f"{name}.{fmt.lower()}"
        path.write_bytes(data)
        rows.append({"id": f"{k:016x}", "source": str(src), "path": str(path), "member": None,
                     "width": im.size[0], "height": im.size[1], "nbytes": len(data), "sha256": _sha(data)})
    # One image inside a tar source, with an id that needs sanitising.
    tar_data = imgtools.encode(photos["coffee"].convert("RGB").rotate(90, expand=True), "JPEG", quality=80)
    tar_path = src / "pack.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("inner/coffee_rot.jpg")
        info.size = len(tar_data)
        tf.addfile(info, io.BytesIO(tar_data))
    rows.append({"id": WEIRD_ID, "source": str(tar_path), "path": str(tar_path), "member": "inner/coffee_rot.jpg",
                 "width": 64, "height": 96, "nbytes": len(tar_data), "sha256": _sha(tar_data)})
    # Two items that cannot be written: a deleted file and a file changed since ingest.
    rows.append({**rows[0], "id": "gone", "path": str(src / "gone.png")})
    changed = src / "changed.png"
    changed.write_bytes(b"not the ingested bytes")
    rows.append({**rows[0], "id": "changed", "path": str(changed)})
    n = len(rows)

    # near_dedup manifest: rows 1 and 2 are removed near duplicates of row 0, row 4 an exact copy of row 3.
    dup_group = [None] * n
    dup_kind = [None] * n
    keep = [True] * n
    for r, g, kind in ((1, 0, "near"), (2, 0, "near"), (4, 3, "exact_bytes")):
        dup_group[r], dup_kind[r], keep[r] = g, kind, False
    manifest = pa.table({
        "id": [r["id"] for r in rows], "source": [r["source"] for r in rows], "path": [r["path"] for r in rows],
        "member": pa.array([r["member"] for r in rows], pa.string()), "width": [r["width"] for r in rows],
        "height": [r["height"] for r in rows], "status": ["ok"] * n, "reject_reason": pa.array([None] * n, pa.string()),
        "dup_group": pa.array(dup_group, pa.int64()), "dup_of": pa.array([None] * n, pa.string()),
        "dup_kind": pa.array(dup_kind, pa.string()), "keep": keep,
    })
    out = root / "D"
    for name, counts in (("ingest", {"inputs": n + 2, "outputs": n, "rejects": {"unsupported_uri": 2}}),
                         ("decode", {"inputs": n, "outputs": n, "rejects": {}})):
        (out / name).mkdir(parents=True)
        _commit(out / name, [], counts)
    (out / "near_dedup").mkdir()
    artifacts.write_parquet_atomic(out / "near_dedup" / "manifest.parquet", manifest)
    _commit(out / "near_dedup", ["manifest.parquet"], {"inputs": n, "outputs": n - 3, "removed": {"near": 2}})

    # The selection: the kept rows (plus the two broken ones), seed images as reasons.
    sel_rows = [k for k in range(n) if keep[k]]
    reasons = []
    for k in sel_rows:
        if k % 2:
            reasons.append([{"seed_set": "pets<b>", "seed_id": rows[0]["id"], "mode": "sample",
                             "similarity": round(0.9 - 0.01 * k, 3)}])
        else:
            reasons.append([{"seed_set": "pets<b>", "seed_id": rows[0]["id"], "mode": "cluster", "cluster": k % 3}])
    reasons[1].append({"seed_set": None, "seed_id": None, "mode": "balanced", "cluster": 1})
    selected = pa.table({
        "row_id": pa.array(sel_rows, pa.int64()),
        **{c: pa.array([rows[k][c] for k in sel_rows], pa.int64() if c in ("width", "height", "nbytes") else
                       pa.string()) for c in ("id", "source", "path", "member", "width", "height", "nbytes", "sha256")},
        "cluster": pa.array([k % 3 for k in sel_rows], pa.int64()),
        "reasons": [json.dumps(r) for r in reasons],
    })
    (out / "retrieve").mkdir()
    artifacts.write_parquet_atomic(out / "retrieve" / "selected.parquet", selected)
    outputs = ["selected.parquet"]
    if with_retrieval:
        cols = ("seed_set", "seed_id", "mode", "similarity", "cluster")
        long = [{"row_id": k, "id": rows[k]["id"], "rank": 0, **{c: r.get(c) for c in cols}}
                for k, rs in zip(sel_rows, reasons) for r in rs]
        artifacts.write_parquet_atomic(out / "retrieve" / "retrieval.parquet", pa.Table.from_pylist(long))
        outputs.append("retrieval.parquet")
    _commit(out / "retrieve", outputs, {"inputs": n - 3, "outputs": selected.num_rows})
    if with_cluster:
        (out / "cluster").mkdir()
        artifacts.write_npy_atomic(out / "cluster" / "offsets.npy", np.array([0, 3, 5, 9, 9], dtype=np.int64))
        _commit(out / "cluster", ["offsets.npy"], {"inputs": 9, "outputs": 9, "clusters": 4})
    return {"out": out, "rows": rows, "selected": selected,
            "bytes": {r["id"]: Path(r["path"]).read_bytes() if r["member"] is None else tar_data for r in rows[:-2]}}


@pytest.fixture
def upstream(tmp_path, imgtools) -> dict:
    return _build_upstream(tmp_path, imgtools)


def _run_shards(out: Path, *overrides: str):
    cfg = load_config(None, ["decode.min_size=16", *overrides])
    return run_stage(shards.STAGE, StageContext(cfg, out)), cfg


def _tar_shas(d: Path) -> dict[str, str]:
    return {p.name: artifacts.file_sha256(p) for p in sorted(d.glob("*.tar"))}


def test_shards_roundtrip_webdataset(upstream):
    import webdataset as wds

    out = upstream["out"]
    res, cfg = _run_shards(out, "shards.max_count=3")
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["nshards"] == 3
    assert res.counts["rejects"] == {"bytes_changed": 1, "unreadable": 1}
    expected_ids = set(upstream["selected"].column("id").to_pylist()) - {"gone", "changed"}
    assert res.counts["outputs"] == len(expected_ids) == index["nsamples"]
    urls = str(out / "shards" / index["pattern"])
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [k for e in index["shardlist"]
                                               for k in json.loads((out / "shards" / e["url"].replace(
                                                   ".tar", "_stats.json")).read_text())["keys"]]
    seen = {}
    for s in samples:
        meta = json.loads(s["json"])
        image = next(v for k, v in s.items() if k in ("jpg", "png", "webp"))
        seen[meta["id"]] = image
        assert "." not in s["__key__"] and "/" not in s["__key__"]
        assert meta["reasons"] and meta["reasons"][0]["seed_set"] == "pets<b>"
    assert set(seen) == expected_ids
    for item_id, data in seen.items():
        assert data == upstream["bytes"][item_id]  # original bytes, untouched
    # Extension follows the decoded format; sample order is the seeded permutation, not row order.
    exts = {next(k for k in s if k in ("jpg", "png", "webp")) for s in samples}
    assert exts == {"jpg", "png", "webp"}
    plan = shards.plan_shards(StageContext(cfg, out))
    by_order = [k for _, k in sorted(zip(plan.column("order").to_pylist(), plan.column("key").to_pylist()))]
    written = [s["__key__"] for s in samples]
    assert written == [k for k in by_order if k in set(written)]
    assert written != sorted(written)


def test_rows_chunked_view_matches_table():
    table = pa.table({"a": list(range(10)), "b": [str(i) for i in range(10)]})
    rows = shards._Rows(table, chunk=3)
    assert len(rows) == 10 and [rows[i] for i in (9, 0, 4, 5, 3)] == [table.to_pylist()[i] for i in (9, 0, 4, 5, 3)]


def test_keys_sanitised_and_unique():
    assert shards.sanitize_key(WEIRD_ID) == "seed_set_img_01_x"
    assert shards.unique_keys(["a.b", "a/b", "a_b"]) == ["a_b", "a_b_1", "a_b_2"]
    long_key = shards.sanitize_key("x" * 200)
    assert len(long_key) == 64 and long_key != shards.sanitize_key("x" * 199)


def test_shard_limits_by_count_and_bytes(upstream):
    out = upstream["out"]
    _run_shards(out, "shards.max_count=3")
    counts = [json.loads(p.read_text())["nsamples"] for p in sorted((out / "shards").glob("*_stats.json"))]
    assert counts == [3, 3, 2]  # 8 writable samples
    shutil.rmtree(out / "shards")
    limit = 40_000
    _run_shards(out, f"shards.max_bytes={limit}")
    sides = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*_stats.json"))]
    assert sum(s["nsamples"] for s in sides) == 8 and len(sides) > 2
    for s in sides:
        size = (out / "shards" / s["url"]).stat().st_size
        assert size == s["filesize"]
        assert size <= limit or s["nsamples"] == 1  # a lone oversize sample gets its own shard
    # Greedy: a shard closed only because the next shard's first sample did not fit in it.
    for a, b in zip(sides, sides[1:]):
        with tarfile.open(out / "shards" / a["url"]) as ta, tarfile.open(out / "shards" / b["url"]) as tb:
            payload = sum(shards.member_bytes(m.size) for m in ta.getmembers())
            first = sum(shards.member_bytes(m.size) for m in tb.getmembers()[:2])
        assert shards.tar_file_size(payload + first) > limit


def test_deterministic_bytes_and_resume(tmp_path, imgtools):
    a = _build_upstream(tmp_path / "a", imgtools)["out"]
    b = tmp_path / "b"
    shutil.copytree(a, b)  # same sources, another output dir
    _run_shards(a, "shards.max_count=3", "executor.workers=3")  # threaded read-ahead
    _run_shards(b, "shards.max_count=3", "executor.workers=1")  # sequential
    shas = _tar_shas(a / "shards")
    assert len(shas) == 3 and shas == _tar_shas(b / "shards")
    assert (a / "shards" / "index.json").read_bytes() == (b / "shards" / "index.json").read_bytes()
    for p in (a / "shards").glob("*.tar"):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
    # Resume: lose the last tar and the commit marker; the earlier shards are kept, the last rebuilt identically.
    last = sorted((a / "shards").glob("*.tar"))[-1]
    kept_mtime = (a / "shards" / "curated-000000.tar").stat().st_mtime_ns
    last.unlink()
    (a / "shards" / artifacts.SUCCESS).unlink()
    stray = a / "shards" / ".curated-000002.tar.killed.tmp"  # what a kill mid-write leaves
    stray.write_bytes(b"partial")
    res, _ = _run_shards(a, "shards.max_count=3")
    assert not res.skipped and _tar_shas(a / "shards") == shas and not stray.exists()
    assert (a / "shards" / "curated-000000.tar").stat().st_mtime_ns == kept_mtime
    # A different seed gives another order.
    shutil.rmtree(b / "shards")
    cfg = load_config(None, ["decode.min_size=16", "shards.max_count=3", "seed=7"])
    run_stage(shards.STAGE, StageContext(cfg, b))
    assert _tar_shas(b / "shards") != shas


def test_reencode_gives_jpegs_within_max_side(upstream):
    out = upstream["out"]
    res, _ = _run_shards(out, "shards.reencode=true", "shards.max_side=48", "shards.quality=80")
    assert res.counts["outputs"] == 8
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    continue
                assert m.name.endswith(".jpg")
                im = Image.open(io.BytesIO(tf.extractfile(m).read()))
                assert im.format == "JPEG" and max(im.size) <= 48 and max(im.size) >= 47
                key = m.name.split(".")[0]
                assert key == shards.sanitize_key(key)
                if key == shards.sanitize_key(WEIRD_ID):
                    assert im.size[1] > im.size[0]  # the rotated (portrait) image stays portrait
            assert meta["width"] <= 48 and meta["height"] <= 48


def test_max_side_without_reencode_is_an_error(upstream):
    with pytest.raises(ValueError, match="max_side"):
        _run_shards(upstream["out"], "shards.max_side=48")


def test_nothing_readable_fails_without_commit(upstream):
    out = upstream["out"]
    shutil.rmtree(Path(upstream["rows"][0]["source"]))  # every source image gone
    with pytest.raises(RuntimeError, match="none of the 10"):
        _run_shards(out)
    assert artifacts.read_success(out / "shards") is None


def test_trainer_reads_the_shards(upstream):
    from dinov2.data.sources import open_source

    out = upstream["out"]
    _run_shards(out, "shards.max_count=4")
    index = json.loads((out / "shards" / "index.json").read_text())
    source = open_source(str(out / "shards" / index["pattern"]))
    assert len(source) == index["nsamples"] == 8
    for i in range(len(source)):
        im = Image.open(io.BytesIO(source.read_bytes(i)))
        im.load()
        assert min(im.size) >= 16 and re.fullmatch(r"[A-Za-z0-9_-]+", source.key(i))


def _add_copy_and_decontamination(out: Path) -> None:
    """copy_dedup (row 6 a copy of row 5, an audit pair) and decontaminate (row 7 contaminated) artifacts."""
    m = artifacts.read_table(out / "near_dedup" / "manifest.parquet")
    n = m.num_rows
    kind, group, keep = (m.column(c).to_pylist() for c in ("dup_kind", "dup_group", "keep"))
    kind[6], group[6], keep[6] = "copy", 5, False
    comp = [5 if r in (5, 6) else (r if keep[r] else -1) for r in range(n)]
    m = m.set_column(m.schema.get_field_index("dup_kind"), "dup_kind", pa.array(kind, pa.string()))
    m = m.set_column(m.schema.get_field_index("dup_group"), "dup_group", pa.array(group, pa.int64()))
    m = m.set_column(m.schema.get_field_index("keep"), "keep", pa.array(keep))
    m = m.append_column("copy_component", pa.array(comp, pa.int64()))
    (out / "copy_dedup").mkdir()
    artifacts.write_parquet_atomic(out / "copy_dedup" / "manifest.parquet", m)
    audit = pa.table({"i": pa.array([5], pa.int64()), "j": pa.array([8], pa.int64()),
                      "sim": pa.array([0.61], pa.float32())})
    artifacts.write_parquet_atomic(out / "copy_dedup" / "audit.parquet", audit)
    _commit(out / "copy_dedup", ["manifest.parquet", "audit.parquet"], {"inputs": 10, "outputs": 9})
    kind[7], keep[7] = "contaminated", False
    m = m.set_column(m.schema.get_field_index("dup_kind"), "dup_kind", pa.array(kind, pa.string()))
    m = m.set_column(m.schema.get_field_index("keep"), "keep", pa.array(keep))
    m = m.append_column("contaminated_by", pa.array([("val&x" if r == 7 else None) for r in range(n)], pa.string()))
    (out / "decontaminate").mkdir()
    artifacts.write_parquet_atomic(out / "decontaminate" / "manifest.parquet", m)
    _commit(out / "decontaminate", ["manifest.parquet"], {"inputs": 9, "outputs": 8})


def test_report_html_and_json(upstream):
    out = upstream["out"]
    _run_shards(out, "shards.max_count=4")
    _add_copy_and_decontamination(out)
    cfg = load_config(None, ["decode.min_size=16", "report.thumb_size=48"])
    res = run_stage(report.STAGE, StageContext(cfg, out))
    rep = json.loads((out / "report" / "report.json").read_text())
    page = (out / "report" / "report.html").read_text()
    stages = {s["stage"]: s for s in rep["stages"]}
    assert list(stages) == ["ingest", "decode", "near_dedup", "copy_dedup", "decontaminate", "cluster", "retrieve",
                            "shards"]
    assert stages["shards"]["outputs"] == 8 and stages["ingest"]["inputs"] == 15
    assert rep["dup_kinds"] == {"from": "decontaminate", "contaminated": 1, "copy": 1, "exact_bytes": 1, "near": 2}
    assert rep["copy_components"] == {"1": 8, "2": 1}
    assert rep["decontamination"] == {"val&x": {"removed_here": 1, "already_removed": 0}}
    assert "val&amp;x" in page and "cos 0.610" in page and "copy: 0000000000000006" in page
    assert rep["cluster_sizes"]["clusters"] == 4 and rep["cluster_sizes"]["empty"] == 1
    assert rep["retrieval"]["pets<b>"]["sample"]["images"] + rep["retrieval"]["pets<b>"]["cluster"]["images"] == 10
    assert rep["retrieval"]["(balanced sample)"] == {"balanced": {"images": 1, "reasons": 1}}
    assert rep["rejects"]["shards"] == {"bytes_changed": 1, "unreadable": 1}
    pngs = re.findall(r'src="(img/[^"]+\.png)"', page)
    assert {"img/funnel.png", "img/cluster_sizes.png", "img/retrieval_similarity.png"} <= set(pngs)
    for p in pngs:
        assert Image.open(out / "report" / p).format == "PNG"
    assert "pets&lt;b&gt;" in page and "pets<b>" not in page  # escaped
    assert ">15<" in page and ">8<" in page  # counts in the stage table
    # Dup groups: kept member then its two near duplicates, each a decodable thumbnail.
    assert page.count("data:image/jpeg;base64,") == res.counts["thumbnails"] >= 5
    thumb = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    import base64

    assert max(Image.open(io.BytesIO(base64.b64decode(thumb))).size) <= 48


def test_report_without_cluster_and_retrieval(tmp_path, imgtools):
    out = _build_upstream(tmp_path, imgtools, with_cluster=False, with_retrieval=False)["out"]
    _run_shards(out)
    cfg = load_config(None, ["decode.min_size=16"])
    run_stage(report.STAGE, StageContext(cfg, out))
    rep = json.loads((out / "report" / "report.json").read_text())
    assert "cluster_sizes" not in rep and "cluster" not in {s["stage"] for s in rep["stages"]}
    page = (out / "report" / "report.html").read_text()
    assert "cluster_sizes.png" not in page and (out / "report" / "img" / "funnel.png").is_file()
    assert rep["shards"]["nsamples"] == 8
    # Retrieval numbers then come from selected.parquet's reasons JSON.
    assert rep["retrieval"]["pets<b>"]["sample"] == {"images": 5, "reasons": 5}
    assert rep["retrieval"]["(balanced sample)"] == {"balanced": {"images": 1, "reasons": 1}}
    assert "seed 0000000000000000" in page
