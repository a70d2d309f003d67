"""Hostile inputs to the model and run side, through the real CLIs (subprocesses with timeouts).

Every case is built at test time. Each CLI must refuse in time, exit nonzero, and say why in one line naming the file
or key: no traceback, and never torch's advice to load with ``weights_only=False``. All cases start together (a
thread pool) so the suite costs about one CLI start-up per core.

Full disk and read-only outputs use tiny tmpfs mounts when this process may mount (root); otherwise a file-size
rlimit stands in for the full disk and ``chmod`` for read-only (which root ignores, hence the mount).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300
TRAIN = [
    "student.arch=vit_custom", "student.embed_dim=32", "student.depth=1", "student.num_heads=2",
    "student.patch_size=8", "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=1",
    "dino.head_n_prototypes=16", "dino.head_hidden_dim=16", "dino.head_bottleneck_dim=8",
    "ibot.head_n_prototypes=16", "train.batch_size_per_gpu=2", "train.num_workers=0", "train.max_iter=2",
    "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0", "train.device=cpu", "train.autocast_dtype=fp32",
    "train.checkpoint_period=1", "evaluation.eval_period_iterations=1",
]  # fmt: skip


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


def _limit_file_size() -> None:  # in the child: a write past 256 KiB fails with EFBIG instead of killing it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def _images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return root


def _weights(root: Path) -> dict[str, Path]:
    from dinov2.models.registry import build_backbone
    from dinov2.weights import export_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_custom", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16,
                           init_values=1.0, block_chunks=0)  # fmt: skip
    good = export_backbone(model, root / "good.pth")
    good_st = export_backbone(model, root / "good.safetensors")
    files = {"good": good}
    (root / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "truncated.safetensors").write_bytes(good_st.read_bytes()[: good_st.stat().st_size // 2])
    (root / "zero.pth").write_bytes(b"")
    (root / "text.pth").write_text("these are not weights\n")
    for name in ("truncated.pth", "truncated.safetensors", "zero.pth", "text.pth"):
        files[name] = root / name
    files["missing.pth"] = root / "missing.pth"
    return files


def _bomb(path: Path) -> Path:
    # 14000 x 14000 = 196M pixels, over twice Pillow's bound; a 1-bit PNG of it is a few tens of kilobytes.
    Image.new("1", (14000, 14000)).save(path, optimize=True)
    return path


def _cases(root: Path) -> dict[str, dict]:
    """name -> {cmd, expect (substrings of the error line), preexec, rc (None: any nonzero)}."""
    data = _images(root / "images")
    w = _weights(root / "weights")
    out = root / "out"
    py = [sys.executable, "-m"]
    cases: dict[str, dict] = {}

    def add(name, cmd, *expect, preexec=None, rc=None):
        cases[name] = {"cmd": cmd, "expect": expect, "preexec": preexec, "rc": rc}

    # --- weights files, through every tool that takes --weights
    extract = [*py, "dinov2.eval.extract", "--data", str(data), "--image-size", "16"]
    for name in ("truncated.pth", "truncated.safetensors", "zero.pth", "text.pth", "missing.pth"):
        add(f"extract_{name}", [*extract, "--weights", str(w[name]), "--output-dir", str(out / name)], name)
    knn = [*py, "dinov2.eval.knn", "--train-dataset", str(data), "--val-dataset", str(data), "--image-size", "16"]
    add("knn_truncated", [*knn, "--weights", str(w["truncated.pth"])], "truncated.pth", "truncated or corrupt")
    linear = [*py, "dinov2.eval.linear", "--train-dataset", str(data), "--image-size", "16"]
    add("linear_text", [*linear, "--weights", str(w["text.pth"]), "--output-dir", str(out / "lin")], "text.pth")
    vis = [*py, "dinov2.eval.visualize", "--images", str(data / "class0" / "0.png"), "--image-size", "16"]
    add("visualize_zero", [*vis, "--weights", str(w["zero.pth"]), "--output-dir", str(out / "v")], "0 bytes")
    export = [*py, "dinov2.weights.export", "--format", "hub"]
    add("export_truncated_safetensors", [*export, "--weights", str(w["truncated.safetensors"]),
                                         "--out", str(out / "e.pth")], "truncated.safetensors")  # fmt: skip
    add("export_missing", [*export, "--weights", str(w["missing.pth"]), "--out", str(out / "e.pth")], "not found")
    (out / "a_dir").mkdir(parents=True)
    add("export_out_is_a_directory", [*export, "--weights", str(w["good"]), "--out", str(out / "a_dir")],
        "is a directory")  # fmt: skip

    # --- visualize: a decompression bomb is refused from its header
    bomb = _bomb(root / "bomb.png")
    add("visualize_bomb", [*py, "dinov2.eval.visualize", "--weights", str(w["good"]), "--images", str(bomb),
                           "--output-dir", str(out / "vb"), "--image-size", "16"], "bomb.png", "decompression bomb")

    # --- training configs
    train = [*py, "dinov2.train", *TRAIN, f"train.dataset_path={data}"]
    (root / "malformed.yaml").write_text("train:\n  max_iter: [1, 2\n")
    (root / "list.yaml").write_text("- train\n- optim\n")
    add("train_malformed_yaml", [*train[:3], "--config-file", str(root / "malformed.yaml"), "--output-dir",
                                 str(out / "t1")], "malformed.yaml", "malformed YAML")  # fmt: skip
    add("train_non_mapping_yaml", [*train[:3], "--config-file", str(root / "list.yaml"), "--output-dir",
                                   str(out / "t2")], "list.yaml", "mapping")  # fmt: skip
    for key in ("evaluation.eval_period_iterations=0", "optim.base_lr=nan", "train.max_iter=0", "train.max_iter=-3"):
        add(f"train_{key}", [*train, key, "--output-dir", str(out / key)], key.split("=")[0])

    # --- output paths: a file, read-only, a full disk
    (root / "a_file").write_text("not a directory")
    add("train_output_is_a_file", [*train, "--output-dir", str(root / "a_file")], "a_file", "not a directory")
    add("extract_output_is_a_file", [*extract, "--weights", str(w["good"]), "--output-dir", str(root / "a_file")],
        "a_file")  # fmt: skip
    add("curate_output_is_a_file", [*py, "data_pipeline.curate", "--output-dir", str(root / "a_file"),
                                    "--stages", "ingest", f"ingest.sources=[{data}]"], "a_file")  # fmt: skip
    readonly = root / "readonly"
    if _mount(readonly, "size=64k,ro"):
        add("train_read_only", [*train, "--output-dir", str(readonly / "run")], "read-only file system")
    elif os.geteuid() != 0:
        readonly.chmod(0o555)
        add("train_read_only", [*train, "--output-dir", str(readonly / "run")], "permission denied")
    full = root / "full"
    if _mount(full, "size=48k"):
        add("train_full_disk", [*train, "--output-dir", str(full / "run")], "no space left", rc=1)
    else:
        add("train_full_disk", [*train, "--output-dir", str(full / "run")], "file size limit", rc=1,
            preexec=_limit_file_size)
    return cases


def _run(case: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(case["cmd"], capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT,
                          preexec_fn=case["preexec"])  # fmt: skip
    done.seconds = time.monotonic() - start
    return done


# One case per CLI runs in the default suite; every case with -m slow (each CLI start costs seconds of torch import).
FAST = [
    "extract_truncated.pth", "knn_truncated", "linear_text", "visualize_bomb", "export_out_is_a_directory",
    "train_evaluation.eval_period_iterations=0", "curate_output_is_a_file", "train_full_disk",
]  # fmt: skip
SLOW = [
    "extract_truncated.safetensors", "extract_zero.pth", "extract_text.pth", "extract_missing.pth", "visualize_zero",
    "export_truncated_safetensors", "export_missing", "train_malformed_yaml", "train_non_mapping_yaml",
    "train_optim.base_lr=nan", "train_train.max_iter=0", "train_train.max_iter=-3", "train_output_is_a_file",
    "extract_output_is_a_file", "train_read_only",
]  # fmt: skip


def _outcomes(root: Path, names: list[str]):
    try:
        cases = {name: case for name, case in _cases(root).items() if name in names}
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(zip(cases, pool.map(_run, cases.values())))
        yield {name: (cases[name], results[name]) for name in cases}
    finally:
        for mount in (root / "readonly", root / "full"):
            subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def fast_outcomes(tmp_path_factory):
    yield from _outcomes(tmp_path_factory.mktemp("hostile_fast"), FAST)


@pytest.fixture(scope="module")
def slow_outcomes(tmp_path_factory):
    yield from _outcomes(tmp_path_factory.mktemp("hostile_slow"), SLOW)


def assert_one_clear_line(done: subprocess.CompletedProcess, expect: tuple[str, ...], rc: int | None) -> None:
    assert done.returncode != 0, done.stdout[-2000:]
    if rc is not None:
        assert done.returncode == rc, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert "weights_only=False" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr[-3000:]
    for text in expect:
        assert text in errors[0], (text, errors[0])


def _check(outcomes: dict, name: str) -> None:
    if name not in outcomes:
        pytest.skip("this machine can neither mount a read-only tmpfs nor drop root's permissions")
    case, done = outcomes[name]
    assert_one_clear_line(done, case["expect"], case["rc"])
    assert done.seconds < TIMEOUT


@pytest.mark.parametrize("name", FAST)
def test_refused_in_one_line(fast_outcomes, name):
    _check(fast_outcomes, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_refused_in_one_line_more(slow_outcomes, name):
    _check(slow_outcomes, name)


def test_full_disk_keeps_the_last_checkpoint_resumable(fast_outcomes):
    case, done = fast_outcomes["train_full_disk"]
    run = Path(case["cmd"][case["cmd"].index("--output-dir") + 1])
    # nothing torn under a final name: every checkpoint directory with a marker holds a complete state file
    for marker in run.glob("checkpoints/*/COMMITTED"):
        torch.load(marker.parent / "state.pth", weights_only=True)


def test_second_trainer_and_second_curation_on_one_dir_are_refused(tmp_path):
    """A holder takes the lock as the CLIs do; a trainer and a curation run on that folder refuse, naming it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hold = ("import sys, time\nfrom dinov2.io.lock import DirectoryLock\n"
            "DirectoryLock(sys.argv[1], 'training run').acquire()\nprint('held', flush=True)\ntime.sleep(300)\n")
    data = _images(tmp_path / "images")
    holders = {name: subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / name)], stdout=subprocess.PIPE,
                                      text=True, env=env) for name in ("train_out", "curate_out")}  # fmt: skip
    try:
        for holder in holders.values():
            assert holder.stdout.readline().strip() == "held"
        cases = {
            "train_out": [sys.executable, "-m", "dinov2.train", *TRAIN, f"train.dataset_path={data}", "--output-dir",
                          str(tmp_path / "train_out")],
            "curate_out": [sys.executable, "-m", "data_pipeline.curate", "--output-dir", str(tmp_path / "curate_out"),
                           "--stages", "ingest", f"ingest.sources=[{data}]"],
        }  # fmt: skip
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(cases, pool.map(lambda c: _run({"cmd": c, "preexec": None}), cases.values())))
        for name, done in results.items():
            assert_one_clear_line(done, (f"pid {holders[name].pid}", "in use"), rc=2)
        assert not (tmp_path / "train_out" / "checkpoints").exists()  # refused before touching anything
    finally:
        for holder in holders.values():
            holder.kill()
            holder.wait()
    assert json.loads((tmp_path / "train_out" / ".lock").read_text())["pid"] == holders["train_out"].pid
