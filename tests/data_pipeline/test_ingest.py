"""Ingest: folders, tar/WebDataset shards and file lists (text, Parquet) -> stable ids, sizes, sha256."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.core.config import CurateConfig
from data_pipeline.ingest.ingest import MANIFEST_SCHEMA, checksum_shard, list_source, stable_id


def test_folder_listing_recursive_sorted_and_stable(planted_src, tmp_path):
    src, truth = planted_src
    rows = list_source(str(src))
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == sorted(truth)
    assert rows == list_source(str(src))  # deterministic
    assert rows[0]["id"] == stable_id(str(src), rows[0]["path"].rsplit("/", 1)[1])
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.png").write_bytes((src / "coins.png").read_bytes())
    (nested / "notes.txt").write_text("not an image")
    (nested / "photo").write_bytes((src / "coins_q50.jpg").read_bytes())  # a JPEG without a suffix
    rows = list_source(str(tmp_path / "a"))
    # Every regular file has a row; its content decides: the suffix-less JPEG is kept, the text is rejected.
    assert [r["path"] for r in rows] == [str(nested / n) for n in ("notes.txt", "photo", "x.png")]
    hashed = checksum_shard(CurateConfig(), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)).to_pylist()
    assert [(r["status"], r["reject_reason"]) for r in hashed] == [("rejected", "not_an_image"), ("ok", ""),
                                                                    ("ok", "")]


def test_file_lists_text_and_parquet(planted_src, tmp_path):
    src, _ = planted_src
    names = ["coins.png", "camera_q50.jpg"]
    txt = tmp_path / "list.txt"
    txt.write_text(f"# comment\n{src / names[0]}\n\nfile://{src / names[1]}\nhttp://example.com/a.jpg\nmissing.jpg\n")
    rows = list_source(str(txt))
    assert [r["reject_reason"] for r in rows] == ["", "", "unsupported_uri", "missing_file"]
    par = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": [str(src / n) for n in names], "caption": ["a", "b"]}), par)
    prow = list_source(str(par))
    assert [r["path"] for r in prow] == [str(src / n) for n in names]
    hashed = checksum_shard(CurateConfig(), pa.Table.from_pylist(prow, schema=MANIFEST_SCHEMA)).to_pylist()
    for r, n in zip(hashed, names):
        data = (src / n).read_bytes()
        assert (r["status"], r["nbytes"], r["sha256"]) == ("ok", len(data), hashlib.sha256(data).hexdigest())


def test_webdataset_shard_members(planted_src, tmp_path):
    src, _ = planted_src
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for key in ("s0", "s1"):
            for ext, data in (("jpg", (src / "coins_q50.jpg").read_bytes()), ("json", b"{}"), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    rows = list_source(str(shard))
    assert [r["member"] for r in rows] == ["s0.jpg", "s1.jpg"]
    hashed = checksum_shard(CurateConfig(), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)).to_pylist()
    want = hashlib.sha256((src / "coins_q50.jpg").read_bytes()).hexdigest()
    assert hashed[0]["sha256"] == hashed[1]["sha256"] == want
    assert len({r["id"] for r in rows}) == 2
