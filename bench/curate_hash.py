"""Benchmark: decode+pHash images/s per core vs the naive PIL+imagehash loop, and 1M-hash near-dup search time.

Usage:
    python bench/curate_hash.py            # sizes 0.3, 1, 3, 6, 12 MP; 1M hashes
    python bench/curate_hash.py --quick    # sizes 0.3, 1, 3 MP; 200k hashes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from data_pipeline.core.config import CurateConfig, HashConfig
from data_pipeline.dedup.near_dedup import near_pairs
from data_pipeline.dedup.phash import hash_images

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def make_corpus(root: Path, sizes_mp: list[float]) -> list[Path]:
    """scikit-image's colour photos (plus the motorcycle stereo view), each as is, mirrored and three crops,
    re-encoded as JPEG q90 at every size in `sizes_mp`."""
    import skimage.data

    arrays = [getattr(skimage.data, n)() for n in PHOTOS] + [skimage.data.stereo_motorcycle()[0]]
    paths = []
    for k, arr in enumerate(arrays):
        im = Image.fromarray(arr).convert("RGB")
        w, h = im.size
        views = [im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), im.crop((0, 0, w // 2, h)),
                 im.crop((0, 0, w, h // 2)), im.crop((w // 10, h // 10, w * 9 // 10, h * 9 // 10))]
        for v, view in enumerate(views):
            for mp in sizes_mp:
                scale = (mp * 1e6 / (view.width * view.height)) ** 0.5
                size = (max(1, round(view.width * scale)), max(1, round(view.height * scale)))
                p = root / f"img{k:02d}v{v}_{mp:g}mp.jpg"
                view.resize(size, Image.Resampling.LANCZOS).save(p, "JPEG", quality=90)
                paths.append(p)
    return paths


def time_naive(paths: list[Path]) -> tuple[float, list[int]]:
    """The loop to beat: full decode to RGB, then imagehash.phash."""
    t0 = time.perf_counter()
    hashes = [int(str(imagehash.phash(Image.open(p).convert("RGB"))), 16) for p in paths]
    return time.perf_counter() - t0, hashes


def time_ours(paths: list[Path], draft_side: int, batch: int = 64) -> tuple[float, list[int]]:
    """The pipeline's path: safe open, draft JPEG decode, batched DCT hashing (bytes read included)."""
    cfg = CurateConfig()
    cfg.hash.draft_side = draft_side
    t0 = time.perf_counter()
    out: list[int] = []
    for s in range(0, len(paths), batch):
        hashes, _ = hash_images([p.read_bytes() for p in paths[s : s + batch]], cfg)
        out.extend(int(h) for h in hashes)
    return time.perf_counter() - t0, out


def bench_hash(sizes_mp: list[float], draft_sides: list[int]) -> dict:
    """Images/s on one core for the naive loop and each draft side (0 = full decode), timed back to back per size,
    plus the share of hashes within 2 bits of the naive ones."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_corpus(Path(tmp), sizes_mp)
        time_naive(paths[:4]), time_ours(paths[:4], 256)  # warm imports and caches
        per_size, t_naive, t_ours, dists = {}, 0.0, dict.fromkeys(draft_sides, 0.0), {s: [] for s in draft_sides}
        for mp in sizes_mp:
            sel = [p for p in paths if p.name.endswith(f"_{mp:g}mp.jpg")]
            nt, nh = time_naive(sel)
            t_naive += nt
            row = {"naive_img_s": round(len(sel) / nt, 1)}
            for side in draft_sides:
                ot, oh = time_ours(sel, side)
                t_ours[side] += ot
                d = [bin(a ^ b).count("1") for a, b in zip(oh, nh)]
                dists[side] += d
                row[f"draft{side}_img_s"] = round(len(sel) / ot, 1)
                row[f"draft{side}_speedup"] = round(nt / ot, 2)
                row[f"draft{side}_within_2_bits"] = round(float(np.mean(np.array(d) <= 2)), 4)
            per_size[f"{mp:g}MP"] = row
    report: dict = {"images": len(paths), "naive_img_s_per_core": round(len(paths) / t_naive, 1)}
    for side in draft_sides:
        d = np.array(dists[side])
        report[f"draft{side}"] = {"img_s_per_core": round(len(paths) / t_ours[side], 1),
                                  "speedup": round(t_naive / t_ours[side], 2),
                                  "within_2_bits": round(float((d <= 2).mean()), 4), "max_bits": int(d.max())}
    report["per_size"] = per_size
    return report


def bench_search(n: int, threshold: int, threads: int, seed: int = 0) -> dict:
    """Self near-dup search over n random 64-bit hashes with 1% planted neighbours at 1..threshold bits."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    planted = rng.choice(n // 2, size=max(1, n // 100), replace=False)
    targets = n // 2 + np.arange(len(planted))
    for src, dst in zip(planted, targets):
        bits = rng.choice(64, size=1 + int(rng.integers(0, max(1, threshold))), replace=False)
        h[dst] = h[src] ^ np.uint64(sum(1 << int(b) for b in bits))
    t0 = time.perf_counter()
    i, j, _ = near_pairs(h, HashConfig(threshold=threshold, index="multihash", threads=threads))
    seconds = time.perf_counter() - t0
    found = set(zip(i.tolist(), j.tolist()))
    recall = np.mean([(int(min(a, b)), int(max(a, b))) in found for a, b in zip(planted, targets)])
    return {"n": n, "threshold": threshold, "threads": threads, "seconds": round(seconds, 2), "pairs": len(found),
            "planted_recall": float(recall)}


def main() -> None:
    """Run both benchmarks and print a JSON report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sizes 0.3, 1, 3 MP and 200k hashes")
    p.add_argument("--sizes", default="", help="comma-separated megapixel sizes (default 0.3,1,3,6,12)")
    p.add_argument("--draft-sides", default="256,512,0", help="draft sides to time (0 = full decode)")
    p.add_argument("--search-n", type=int, default=0, help="hashes in the search benchmark (default 1M)")
    p.add_argument("--threshold", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    default_sizes = [0.3, 1, 3] if args.quick else [0.3, 1, 3, 6, 12]
    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    n = args.search_n or (200_000 if args.quick else 1_000_000)
    report = {"hash": bench_hash(sizes, [int(x) for x in args.draft_sides.split(",")]),
              "search": bench_search(n, args.threshold, args.threads)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
