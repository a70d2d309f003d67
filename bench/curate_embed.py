"""Benchmark: embedding throughput of a ViT-S/14 (random init) at 224 px on real JPEGs.

Compares the bare model forward on pre-made tensors with the embed stage's path (read bytes, safe decode, resize +
center crop in loader workers, model in the main process, float16 chunks written), with and without loader workers.

Usage:
    python bench/curate_embed.py                 # 128 images x 2 interleaved rounds, batch 32, loader_workers 2
    python bench/curate_embed.py --n 256 --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from data_pipeline.core.config import CurateConfig
from data_pipeline.embed.embed import embed_chunks
from data_pipeline.embed.embedders import build_embedder

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def make_jpegs(root: Path, n: int) -> list[Path]:
    """`n` JPEG q90 files from scikit-image's colour photos: flips and crops at 0.25-1 MP."""
    import skimage.data

    photos = [Image.fromarray(getattr(skimage.data, p)()).convert("RGB") for p in PHOTOS]
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        im = photos[k % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = im.crop((x, y, x + cw, y + ch))
        if k % 2:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = (rng.uniform(0.25, 1.0) * 1e6 / (cw * ch)) ** 0.5
        view = view.resize((max(32, round(cw * scale)), max(32, round(ch * scale))), Image.Resampling.LANCZOS)
        p = root / f"img{k:05d}.jpg"
        view.save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def _clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of its finished children, e.g. joined loader workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime


def time_bare(embedder, n: int, batch: int, side: int) -> tuple[float, float]:
    """(wall, CPU) seconds for `n` images through `embedder.embed` on pre-made tensors (model only)."""
    x = torch.randn(batch, 3, side, side)
    embedder.embed(x[:2])  # warm-up
    w0, c0 = _clocks()
    for start in range(0, n, batch):
        embedder.embed(x[: min(batch, n - start)])
    w1, c1 = _clocks()
    return w1 - w0, c1 - c0


def time_stage_path(embedder, cfg: CurateConfig, paths: list[Path], work: Path) -> tuple[float, float]:
    """(wall, CPU) seconds for the embed stage's chunked path over the JPEG files."""
    items = pa.table({"path": [str(p) for p in paths], "member": pa.array([None] * len(paths), pa.string())})
    w0, c0 = _clocks()
    embed_chunks(embedder, items, cfg, work, "pool")
    w1, c1 = _clocks()
    return w1 - w0, c1 - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    parser.add_argument("--batch", type=int, default=32, help="embed.batch_size")
    parser.add_argument("--workers", type=int, default=2, help="embed.loader_workers for the overlapped run")
    args = parser.parse_args()

    from dinov2.models.registry import build_backbone
    from dinov2.weights import export_backbone

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jpg").mkdir()
        paths = make_jpegs(root / "jpg", args.n)
        torch.manual_seed(0)
        ckpt = export_backbone(build_backbone("vit_small", patch_size=14, img_size=224), root / "vits14.pth")
        cfg = CurateConfig()
        cfg.embed.ssl_model, cfg.embed.ssl_resolution = str(ckpt), 224
        cfg.embed.batch_size, cfg.embed.chunk_size, cfg.embed.device = args.batch, 4096, "cpu"
        embedder = build_embedder("dinov2", str(ckpt), cfg.embed, "ssl")
        mp = np.mean([Image.open(p).width * Image.open(p).height for p in paths]) / 1e6
        print(f"{args.n} JPEGs (mean {mp:.2f} MP), ViT-S/14 @ 224, batch {args.batch}, "
              f"torch threads {torch.get_num_threads()}, fp32 CPU")

        # Paths are interleaved round by round and the median kept, so that load drifting on a shared machine
        # hits every path alike.
        labels = ["bare forward (pre-made tensors)"] + [f"embed path, loader_workers={w}" for w in (args.workers, 0)]
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
        for r in range(args.rounds):
            times[labels[0]].append(time_bare(embedder, args.n, args.batch, 224))
            for label, workers in zip(labels[1:], (args.workers, 0)):
                cfg.embed.loader_workers = workers
                times[label].append(time_stage_path(embedder, cfg, paths, root / f"work{r}-{workers}"))
        med = {label: np.median(np.array(times[label]), axis=0) for label in labels}  # (wall, cpu)
        base_wall, base_cpu = med[labels[0]]
        print(f"{'path':<36} {'seconds':>8} {'img/s':>8} {'vs bare':>8} {'CPU s':>8} {'CPU vs bare':>12}"
              f"   (medians of {args.rounds} rounds)")
        for label in labels:
            wall, cpu = med[label]
            print(f"{label:<36} {wall:>8.2f} {args.n / wall:>8.1f} {base_wall / wall:>8.0%} {cpu:>8.1f} "
                  f"{cpu / base_cpu:>12.2f}x")


if __name__ == "__main__":
    main()
