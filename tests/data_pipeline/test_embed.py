"""Embed stages: outputs and shapes, copy similarity of planted copies, determinism, kill-and-resume, errors."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, SeedSetConfig, config_to_yaml
from data_pipeline.core.stage import StageContext, run_stage
from data_pipeline.embed.embed import COPY_STAGE, KILL_AFTER_CHUNKS_ENV, SSL_STAGE, load_embeddings, make_plan
from data_pipeline.embed.embedders import ResizeCenterCrop, ShortEdgeResize, build_embedder

REPO = Path(__file__).resolve().parents[2]
POOL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "clock")
COPIED = ("astronaut", "coffee", "chelsea", "camera")  # re-encoded copies of these go into the eval set


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, imgtools) -> dict:
    """Pool photos (one inside a tar, one truncated, one not kept), and an eval folder of planted copies."""
    root = tmp_path_factory.mktemp("embed_corpus")
    pool, evals, empty = root / "pool", root / "eval", root / "empty_set"
    for d in (pool, evals, empty):
        d.mkdir()
    photos = imgtools.load_photos(names=POOL_PHOTOS)
    items = []  # (id, path, member, keep)
    for name, im in photos.items():
        p = pool / f"{name}.png"
        p.write_bytes(imgtools.encode(im, "PNG"))
        items.append((name, str(p), None, True))
    tar = pool / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        data = imgtools.encode(photos["rocket"].convert("RGB").rotate(90, expand=True), "JPEG", quality=92)
        info = tarfile.TarInfo("rot/rocket90.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    items.append(("rocket90", str(tar), "rot/rocket90.jpg", True))
    jpg = imgtools.encode(photos["clock"].convert("RGB"), "JPEG", quality=90)
    (pool / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    items.insert(3, ("truncated", str(pool / "truncated.jpg"), None, True))
    items.insert(1, ("dropped", str(pool / "coins.png"), None, False))  # removed upstream: must not be embedded
    for name in COPIED:
        rgb = photos[name].convert("RGB")
        w, h = rgb.size
        if name == "camera":
            rgb = rgb.resize((w * 2 // 3, h * 2 // 3), Image.Resampling.LANCZOS)
        (evals / f"{name}_q50.jpg").write_bytes(imgtools.encode(rgb, "JPEG", quality=50))
    (evals / "broken.jpg").write_bytes(b"not an image")
    return {"items": items, "eval": evals, "empty": empty}


def write_upstream(out: Path, stage: str, items: list) -> None:
    """A committed upstream manifest stage (only the columns the embed stages read, plus keep)."""
    table = pa.table({
        "id": [i for i, _, _, _ in items], "source": ["pool"] * len(items), "path": [p for _, p, _, _ in items],
        "member": pa.array([m for _, _, m, _ in items], pa.string()), "status": ["ok"] * len(items),
        "keep": [k for _, _, _, k in items],
    })
    d = out / stage
    artifacts.write_parquet_atomic(d / "manifest.parquet", table)
    artifacts.commit_stage(d, "synthetic", ["manifest.parquet"], {"inputs": len(items), "outputs": len(items)})


def make_ctx(out: Path, corpus: dict, copy_model: Path | None = None, ssl_model: Path | None = None,
             **embed_kw) -> StageContext:
    cfg = CurateConfig()
    cfg.decode.min_size = 16
    cfg.embed.copy_model = str(copy_model or "")
    cfg.embed.ssl_model = str(ssl_model or "")
    cfg.embed.ssl_resolution = 56
    cfg.embed.batch_size = 4
    cfg.embed.chunk_size = 4
    cfg.embed.loader_workers = 0
    cfg.embed.device = "cpu"
    for k, v in embed_kw.items():
        setattr(cfg.embed, k, v)
    cfg.decontaminate.eval_sets = [f"copies={corpus['eval']}", str(corpus["empty"])]
    cfg.retrieve.seed_sets = [SeedSetConfig(name="seedA", sources=[str(corpus["eval"])])]
    for stage in ("near_dedup", "decontaminate"):
        write_upstream(out, stage, corpus["items"])
    return StageContext(cfg, out)


def test_transforms_match_reference_and_torchvision():
    from torchvision import transforms as T

    rgb = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    sscd = ShortEdgeResize(288)
    assert sscd.output_size(300, 200) == (432, 288) and sscd.output_size(200, 301) == (288, 433)
    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    ref = T.Compose([T.Resize(288), T.ToTensor(), norm])(Image.fromarray(rgb))
    ours = sscd(rgb)
    assert ours.shape == ref.shape == (3, 288, 432)
    assert torch.allclose(ours, ref, atol=1e-5)
    crop = ResizeCenterCrop(256, 224)
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     norm])(Image.fromarray(rgb))
    assert torch.allclose(crop(rgb), ref, atol=1e-5)


def test_copy_stage_outputs_and_copy_similarity(tmp_path, corpus, copy_model_path):
    ctx = make_ctx(tmp_path, corpus, copy_model=copy_model_path)
    res = run_stage(COPY_STAGE, ctx)
    d = tmp_path / "embed_copy"
    pool, rows = load_embeddings(d, "pool")
    assert pool.dtype == np.float16 and pool.shape == (len(POOL_PHOTOS) + 1, 192)  # + the tar member
    norms = np.linalg.norm(pool.astype(np.float32), axis=1)
    assert np.abs(norms - 1).max() < 2e-3
    ids = rows.column("id").to_pylist()
    assert "truncated" not in ids and "dropped" not in ids and "rocket90" in ids
    assert rows.column("row_id").to_pylist() == [k for k, it in enumerate(corpus["items"])
                                                 if it[3] and it[0] != "truncated"]
    assert res.counts["rejects"] == {"truncated": 1} and res.counts["outputs"] == pool.shape[0]
    assert res.counts["sets"]["eval-copies"]["rejects"] == {"unsupported_format": 1}
    assert not (d / "_work").exists()

    ev, ev_rows = load_embeddings(d, "eval-copies")
    assert ev.shape == (len(COPIED), 192)
    assert ev_rows.column_names == ["id", "source", "path", "member", "width", "height"]
    empty, empty_rows = load_embeddings(d, "eval-empty_set")  # a bare path is named by its basename
    assert empty.shape == (0, 192) and empty_rows.num_rows == 0
    sims = ev.astype(np.float32) @ pool.astype(np.float32).T  # [copies, pool]
    own = np.array([ids.index(Path(p).name.split("_q50")[0]) for p in ev_rows.column("path").to_pylist()])
    match = sims[np.arange(len(own)), own]
    others = sims.copy()
    others[np.arange(len(own)), own] = -1
    assert match.min() > 0.9, match
    assert others.max() < match.min(), (others.max(), match)
    # The camera copy was shrunk to 2/3: its recorded size is the decoded one.
    cam = ev_rows.filter(pc.match_substring(ev_rows.column("path"), "camera"))
    assert cam.column("width")[0].as_py() < 256


def test_bucketed_batches_equal_single_image_embeddings(tmp_path, corpus, copy_model_path):
    ctx = make_ctx(tmp_path, corpus, copy_model=copy_model_path, loader_workers=2, batch_size=3, chunk_size=5)
    run_stage(COPY_STAGE, ctx)
    pool, rows = load_embeddings(tmp_path / "embed_copy", "pool")
    emb = build_embedder("torchscript", str(copy_model_path), ctx.cfg.embed, "copy")
    by_id = {i: (p, m) for i, p, m, _ in corpus["items"]}
    for k, row_id in enumerate(rows.column("id").to_pylist()):
        path, member = by_id[row_id]
        if member:
            with tarfile.open(path) as tf:
                im = Image.open(tf.extractfile(member)).convert("RGB")
        else:
            im = Image.open(path).convert("RGB")
        one = emb.embed(emb.preprocess(np.asarray(im))[None])[0].numpy()
        assert np.abs(one - pool[k].astype(np.float32)).max() < 2e-3


def test_two_runs_byte_identical(tmp_path, corpus, copy_model_path):
    ref = make_ctx(tmp_path / "a", corpus, copy_model=copy_model_path)
    run_stage(COPY_STAGE, ref)
    again = make_ctx(tmp_path / "b", corpus, copy_model=copy_model_path)
    run_stage(COPY_STAGE, again)
    for name in ("pool.npy", "pool_rows.parquet", "eval-copies.npy", "eval-copies.parquet"):
        assert (tmp_path / "a/embed_copy" / name).read_bytes() == (tmp_path / "b/embed_copy" / name).read_bytes()
    assert run_stage(COPY_STAGE, again).skipped


def test_kill_and_resume_gives_identical_outputs(tmp_path, corpus, copy_model_path):
    ref = make_ctx(tmp_path / "a", corpus, copy_model=copy_model_path)
    run_stage(COPY_STAGE, ref)
    # A run SIGKILLed after its second chunk file leaves chunks and no commit; the rerun resumes from them.
    out = tmp_path / "c"
    ctx = make_ctx(out, corpus, copy_model=copy_model_path)
    script = (
        "import sys; from pathlib import Path; from data_pipeline.core.config import load_config;"
        "from data_pipeline.embed.embed import COPY_STAGE;"
        "from data_pipeline.core.stage import StageContext, run_stage;"
        "run_stage(COPY_STAGE, StageContext(load_config(sys.argv[1]), Path(sys.argv[2])))"
    )
    cfg_yaml = tmp_path / "c.yaml"
    cfg_yaml.write_text(config_to_yaml(ctx.cfg))
    env = {**os.environ, KILL_AFTER_CHUNKS_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", script, str(cfg_yaml), str(out)], cwd=REPO, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    chunks = sorted((out / "embed_copy/_work").glob("pool-chunk-*.npy"))
    assert [c.name for c in chunks] == ["pool-chunk-000000.npy", "pool-chunk-000001.npy"]
    assert not (out / "embed_copy/_SUCCESS.json").exists()
    # A copy of the interrupted run with chunk 0 negated shows that resuming reuses chunks instead of redoing them.
    shutil.copytree(out, tmp_path / "d")
    tampered = tmp_path / "d/embed_copy/_work/pool-chunk-000000.npy"
    first = np.load(tampered)
    np.save(tampered, -first)
    run_stage(COPY_STAGE, StageContext(ctx.cfg, tmp_path / "d"))
    resumed, _ = load_embeddings(tmp_path / "d/embed_copy", "pool")
    assert np.array_equal(resumed[: len(first)], -first) and len(first) > 0
    # A run killed while deleting `_work` can leave a chunk's .npy without its .parquet: that chunk is redone.
    shutil.copytree(out, tmp_path / "e")
    (tmp_path / "e/embed_copy/_work/pool-chunk-000001.parquet").unlink()
    run_stage(COPY_STAGE, StageContext(ctx.cfg, tmp_path / "e"))
    res = run_stage(COPY_STAGE, ctx)
    assert not res.skipped
    for name in ("pool.npy", "pool_rows.parquet", "eval-copies.npy", "eval-copies.parquet", "_SUCCESS.json"):
        assert (out / "embed_copy" / name).read_bytes() == (tmp_path / "a/embed_copy" / name).read_bytes(), name
        assert (tmp_path / "e/embed_copy" / name).read_bytes() == (tmp_path / "a/embed_copy" / name).read_bytes()


def test_ssl_stage_pool_and_seed_sets(tmp_path, corpus, ssl_model_path):
    ctx = make_ctx(tmp_path, corpus, ssl_model=ssl_model_path, ssl_patch_mean=True, loader_workers=1)
    res = run_stage(SSL_STAGE, ctx)
    d = tmp_path / "embed_ssl"
    pool, rows = load_embeddings(d, "pool")
    assert pool.shape == (len(POOL_PHOTOS) + 1, 256) and pool.dtype == np.float16  # concat(CLS, mean patch), D=128
    assert np.abs(np.linalg.norm(pool.astype(np.float32), axis=1) - 1).max() < 2e-3
    seeds, seed_rows = load_embeddings(d, "seed-seedA")
    assert seeds.shape == (len(COPIED), 256)
    assert seed_rows.column_names == ["id", "source", "path", "member", "width", "height", "nbytes", "sha256"]
    for path, nbytes, sha in zip(*(seed_rows.column(c).to_pylist() for c in ("path", "nbytes", "sha256"))):
        data = Path(path).read_bytes()
        assert nbytes == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert res.counts["dim"] == 256 and res.counts["sets"]["seed-seedA"]["outputs"] == len(COPIED)
    # Distinct photos get distinct descriptors even from a random-init ViT.
    sims = pool.astype(np.float32) @ pool.astype(np.float32).T
    assert sims[~np.eye(len(pool), dtype=bool)].max() < 0.9999


def test_downstream_knobs_do_not_re_embed(tmp_path, corpus, copy_model_path, ssl_model_path):
    ctx = make_ctx(tmp_path, corpus, copy_model=copy_model_path, ssl_model=ssl_model_path)
    assert not run_stage(COPY_STAGE, ctx).skipped and not run_stage(SSL_STAGE, ctx).skipped
    ctx.cfg.decontaminate.threshold, ctx.cfg.decontaminate.k = 0.1, 5
    ctx.cfg.retrieve.seed_sets[0].mode, ctx.cfg.retrieve.seed_sets[0].n_neighbors = "cluster", 99
    assert run_stage(COPY_STAGE, ctx).skipped and run_stage(SSL_STAGE, ctx).skipped
    # which sets exist is part of the plan: renaming one is a new result
    ctx.cfg.decontaminate.eval_sets = [f"renamed={corpus['eval']}"]
    ctx.cfg.retrieve.seed_sets[0].name = "seedB"
    assert not run_stage(COPY_STAGE, ctx).skipped and not run_stage(SSL_STAGE, ctx).skipped
    assert (tmp_path / "embed_copy" / "eval-renamed.npy").is_file()
    assert (tmp_path / "embed_ssl" / "seed-seedB.npy").is_file()


def test_model_file_in_fingerprint(tmp_path, corpus, copy_model_path):
    ctx = make_ctx(tmp_path, corpus, copy_model=copy_model_path)
    assert run_stage(COPY_STAGE, ctx).skipped is False
    assert run_stage(COPY_STAGE, ctx).skipped is True
    other = tmp_path / "other.pt"
    other.write_bytes(copy_model_path.read_bytes() + b"\0")  # same path semantics, different bytes
    ctx.cfg.embed.copy_model = str(other)
    digests = set(make_plan(ctx, "near_dedup", "copy").column("model_sha256").to_pylist())
    assert len(digests) == 1 and digests != {artifacts.file_sha256(copy_model_path)}


@pytest.mark.parametrize("stage,key", [(COPY_STAGE, "embed.copy_model"), (SSL_STAGE, "embed.ssl_model")])
@pytest.mark.parametrize("path", ["", "/nonexistent/model.pt"])
def test_missing_model_is_one_line_error_naming_the_key(tmp_path, corpus, stage, key, path):
    ctx = make_ctx(tmp_path, corpus)
    setattr(ctx.cfg.embed, key.split(".")[1], path)
    with pytest.raises(ValueError) as err:
        run_stage(stage, ctx)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_ssl_resolution_must_be_patch_multiple(tmp_path, corpus, ssl_model_path):
    ctx = make_ctx(tmp_path, corpus, ssl_model=ssl_model_path, ssl_resolution=50)
    with pytest.raises(ValueError, match="embed.ssl_resolution=50 must be a multiple of the model's patch size 14"):
        build_embedder("dinov2", str(ssl_model_path), ctx.cfg.embed, "ssl")
