"""Hostile user files and curation processes, through the real CLIs (subprocesses with timeouts).

Each case is built at test time: symlink loops and ``..`` links, FIFOs and sockets named like images and shards, a
non-tar named ``.tar``, truncated shards, a missing shard in a list, images without an image suffix, an ``.ico``, a
name that is not UTF-8, float and 32-bit integer images; bad curation configs; the curation CLI killed with SIGKILL.
Every run must finish or refuse in time, in one line without a traceback, with a reason per rejected item, nothing
lost, and no process left behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.data.sources import open_source
from dinov2.io.files import unescape_name

REPO = Path(__file__).resolve().parents[2]
TINY_CURATE = REPO / "configs" / "curate" / "tiny.yaml"
NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 e-acute: not UTF-8


def run_cli(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root; a hang fails the test at ``timeout`` seconds."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def image_bytes(seed: int, fmt: str = "JPEG", side: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def wide_tiff(mode: str) -> bytes:
    """A float image in [0, 1] or a 32-bit integer image holding 8-bit values: both decoded to black before."""
    ramp = np.tile(np.linspace(0.0, 1.0, 40), (40, 1))
    array = ramp.astype(np.float32) if mode == "F" else (ramp * 255).astype(np.int32)
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "TIFF")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cut_tar(path: Path, member: str) -> None:
    """Truncate a tar in the middle of ``member``'s data (as an interrupted copy leaves it)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    os.truncate(path, info.offset_data + info.size // 2)


@pytest.fixture
def hostile(tmp_path):
    """A folder holding every hostile case, and the image paths that must be used exactly once."""
    root = tmp_path / "crawl"
    (root / "sub").mkdir(parents=True)
    images = {
        "ok.jpg": image_bytes(0), "photo.jfif": image_bytes(1), "noext": image_bytes(2), NON_UTF8: image_bytes(3),
        "float.tif": wide_tiff("F"), "int32.tif": wide_tiff("I"), "sub/deep.png": image_bytes(4, "PNG"),
    }
    for name, data in images.items():
        (root / name).write_bytes(data)
    (root / "icon.ico").write_bytes(image_bytes(5, "ICO"))
    (root / "notes.txt").write_text("not an image")
    (root / "fake.tar").write_text("not a tar either")
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "fifo.tar")  # tarfile.open would block on it for ever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    (root / "sub" / "loop").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    (root / "link_to_sub").symlink_to("sub")
    write_tar(root / "cut.tar", {f"s{i}.jpg": image_bytes(10 + i, side=64) for i in range(3)})
    cut_tar(root / "cut.tar", "s2.jpg")
    yield root, images
    sock.close()


def test_curation_lists_every_entry_once_with_a_reason_and_never_hangs(hostile, tmp_path):
    root, images = hostile
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'ok.jpg'}\n{tmp_path / 'missing.tar'}\n")
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_cli(["data_pipeline.curate", "--config", str(TINY_CURATE), "--output-dir", str(out),
                      "--stages", "ingest,decode", f"ingest.sources=[{root},{listing}]", "executor.workers=1"],
                     timeout=180)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - start < 120
    rows = pq.read_table(out / "decode" / "manifest.parquet").to_pylist()
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        if r["source"] != str(root):
            continue
        key = os.path.relpath(unescape_name(r["path"]), root) + (f"::{r['member']}" if r["member"] else "")
        by_name.setdefault(key, []).append(r)
    listed = [(r["path"], r["reject_reason"]) for r in rows if r["source"] == str(listing)]
    assert listed == [(str(root / "ok.jpg"), ""), (str(tmp_path / "missing.tar"), "missing_file")]
    reasons = {k: [r["reject_reason"] for r in v] for k, v in by_name.items()}
    # Every image is accepted exactly once, through its real path; the non-UTF-8 name is stored and read back.
    for name in images:
        assert reasons.get(name) == [""], (name, reasons.get(name))
    assert reasons["fifo.jpg"] == ["fifo"] and reasons["fifo.tar"] == ["fifo"] and reasons["sock.png"] == ["socket"]
    assert reasons["fake.tar"] == ["not_a_tar"] and reasons["notes.txt"] == ["not_an_image"]
    assert reasons["icon.ico"] == ["unsupported_format"]
    assert reasons["sub/loop"] == reasons["sub/up"] == reasons["link_to_sub"] == ["link_to_listed_folder"]
    assert reasons["cut.tar::s0.jpg"] == reasons["cut.tar::s1.jpg"] == [""]
    assert reasons["cut.tar::s2.jpg"][0].startswith("unreadable") and reasons["cut.tar"] == ["truncated_tar"]
    assert sum(len(v) for v in by_name.values()) == len(by_name)  # nothing listed twice
    assert all(r["status"] == ("rejected" if r["reject_reason"] else "ok") for r in rows)


def test_trainer_trains_on_a_hostile_folder_each_image_once(hostile, tmp_path):
    root, images = hostile
    source = open_source(str(root))
    keys = sorted(source.key(i) for i in range(len(source)))
    assert keys == sorted(images)  # links add nothing twice; suffix-less JPEGs are found by content
    assert source.listing_skips == {"fifo": 2, "socket": 1, "link_to_listed_folder": 3, "not_an_image": 3,
                                    "unsupported_format": 1}
    result = run_cli(["dinov2.train", "--output-dir", str(tmp_path / "run"), *tiny_train(root, 1)], timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    log = result.stderr + result.stdout
    assert "entries not used" in log and "'fifo': 2" in log, log[-3000:]


def tiny_train(data: Path | str, max_iter: int) -> list[str]:
    return [
        f"train.dataset_path={data}", "student.arch=vit_custom", "student.embed_dim=32", "student.depth=1",
        "student.num_heads=2", "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
        "crops.local_crops_number=1", "dino.head_n_prototypes=32", "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=32", "train.batch_size_per_gpu=4",
        "train.num_workers=0", f"train.max_iter={max_iter}", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=3",
        "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=1",
        "train.device=cpu", "train.log_period=1", "train.checkpoint_period=100", "train.autocast_dtype=fp32",
    ]


def test_trainer_counts_what_a_truncated_or_missing_shard_lost(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "shard-000.tar", {f"a{i}.jpg": image_bytes(i, side=48) for i in range(6)})
    write_tar(shards / "shard-001.tar", {f"b{i}.jpg": image_bytes(20 + i, side=48) for i in range(4)})
    cut_tar(shards / "shard-001.tar", "b2.jpg")  # b3 is lost with it
    listing = tmp_path / "shards.txt"
    listing.write_text("shards/shard-000.tar\nshards/shard-001.tar\nshards/shard-002.tar\n")
    result = run_cli(["dinov2.train", "--output-dir", str(tmp_path / "run"), *tiny_train(listing, 1)], timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    log = result.stderr + result.stdout
    assert "shard-001.tar is truncated" in log, log[-3000:]
    skipped = log.rsplit("images skipped", 1)[1].splitlines()[0]
    assert "'truncated': 1" in skipped and "'truncated_shard': 1" in skipped and "'missing': 1" in skipped, skipped


def test_extract_parquet_keeps_a_name_that_is_not_utf8(tmp_path):
    import torch

    from dinov2.models.registry import build_backbone
    from dinov2.weights import export_backbone

    data = tmp_path / "images"
    data.mkdir()
    names = ["a.jpg", NON_UTF8]
    for i, name in enumerate(names):
        (data / name).write_bytes(image_bytes(i))
    torch.manual_seed(0)
    model = build_backbone("vit_custom", embed_dim=32, depth=1, num_heads=2, patch_size=14, img_size=28)
    weights = export_backbone(model, tmp_path / "tiny.pth", layout="hub")
    out = tmp_path / "features"
    result = run_cli(["dinov2.eval.extract", "--weights", str(weights), "--data", str(data), "--output-dir", str(out),
                      "--format", "parquet", "--image-size", "28", "--device", "cpu"], timeout=180)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    ids = pq.read_table(out / "ids.parquet").to_pylist()
    assert sorted(unescape_name(r["key"]) for r in ids) == sorted(names) and all(r["valid"] for r in ids)
    assert pq.read_table(out / "features.parquet").num_rows == len(names)
    assert json.loads((out / "extract.json").read_text())["n_unreadable"] == 0


@pytest.mark.parametrize("case", ["negative_n_neighbors", "missing_eval_set", "fifo_source", "malformed_yaml"])
def test_curation_refuses_a_bad_config_before_any_stage(case, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(0))
    model = tmp_path / "model.pt"
    model.write_bytes(b"stand-in: never loaded, the config is refused first")
    config = tmp_path / "config.yaml"
    overrides = [f"ingest.sources=[{src}]"]
    if case == "negative_n_neighbors":
        config.write_text(f"retrieve:\n  seed_sets:\n    - name: s\n      sources: [{src}]\n      n_neighbors: -3\n")
        needles = ["retrieve.seed_sets[0].n_neighbors", "-3"]
    elif case == "missing_eval_set":
        config.write_text(f"embed:\n  copy_model: {model}\ndecontaminate:\n  eval_sets: [{tmp_path / 'gone'}]\n")
        needles = ["decontaminate.eval_sets[0]", "gone"]
    elif case == "fifo_source":
        os.mkfifo(tmp_path / "pipe")
        config.write_text("{}\n")
        overrides = [f"ingest.sources=[{tmp_path / 'pipe'}]"]
        needles = ["ingest.sources[0]", "FIFO"]
    else:
        config.write_text("ingest: [unclosed\n")
        needles = ["malformed YAML", "config.yaml"]
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_cli(["data_pipeline.curate", "--config", str(config), "--output-dir", str(out), *overrides],
                     timeout=60)
    assert time.monotonic() - start < 30
    assert_one_line_refusal(result, *needles)
    assert not (out / "ingest").exists()  # refused before the first stage


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: the CLI and everything it started, re-parented or not."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
def test_killing_the_curation_cli_leaves_no_process_and_closes_stderr(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATA_PIPELINE_SHARD_SLEEP_S": "120"}  # workers stay busy
    cmd = [sys.executable, "-m", "data_pipeline.curate", "--config", str(TINY_CURATE), "--output-dir",
           str(tmp_path / "out"), "--stages", "ingest", f"ingest.sources=[{src}]"]
    # Its own session, so every descendant can be found by session id after being re-parented.
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # CLI, resource tracker, forkserver and two workers.
        while len(_session_members(cli.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_session_members(cli.pid)) >= 5, "the pool did not start"
        os.kill(cli.pid, signal.SIGKILL)  # the CLI alone, as the OOM killer does
        killed = time.monotonic()
        reader = threading.Thread(target=cli.stderr.read)  # returns once every holder of the pipe is gone
        reader.start()
        reader.join(timeout=15)
        assert not reader.is_alive(), f"stderr still open 15 s after the kill; alive: {_session_members(cli.pid)}"
        cli.wait(timeout=10)
        while _session_members(cli.pid) and time.monotonic() - killed < 15:
            time.sleep(0.2)
        assert _session_members(cli.pid) == []
    finally:
        for pid in _session_members(cli.pid):  # never leave a survivor behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
