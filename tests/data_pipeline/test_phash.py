"""Batched pHash equals imagehash bit for bit; draft decoding stays within a few bits; degenerate hashes flagged."""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image

from data_pipeline.core.config import CurateConfig, DecodeConfig
from data_pipeline.dedup.phash import gray_thumbnail, hash_images, is_degenerate, pack_bits, phash_batch


def test_phash_batch_bit_identical_to_imagehash(imgtools):
    rng = np.random.default_rng(0)
    photos = list(imgtools.load_photos(96).values())
    thumbs = [p.convert("L").resize((32, 32), Image.Resampling.LANCZOS) for p in photos]
    thumbs += [Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(20)]
    ours = phash_batch(np.stack([np.asarray(t) for t in thumbs]))
    ref = [int(str(imagehash.phash(t)), 16) for t in thumbs]
    assert ours.dtype == np.uint64 and ours.tolist() == ref


def test_pack_bits_matches_imagehash_hex():
    bits = np.random.default_rng(1).random((5, 8, 8)) > 0.5
    assert pack_bits(bits.reshape(5, 64)).tolist() == [int(str(imagehash.ImageHash(b)), 16) for b in bits]


def test_full_decode_hash_equals_naive_loop(imgtools):
    cfg = CurateConfig()
    cfg.hash.draft_side = 0
    photos = imgtools.load_photos(200)
    datas = [imgtools.encode(p.convert("RGB"), "JPEG", quality=90) for p in photos.values()]
    hashes, flags = hash_images(datas, cfg)
    import io

    naive = [int(str(imagehash.phash(Image.open(io.BytesIO(d)).convert("RGB"))), 16) for d in datas]
    assert hashes.tolist() == naive and (flags == 1).all()


def test_draft_hash_close_to_naive(imgtools):
    photos = imgtools.load_photos(2048)
    # 2048x1536 JPEGs: draft_side 512 decodes at 1/2 scale, 256 at 1/4.
    datas = [imgtools.encode(p.convert("RGB").resize((2048, 1536)), "JPEG", quality=90) for p in photos.values()]
    import io

    naive = [int(str(imagehash.phash(Image.open(io.BytesIO(d)).convert("RGB"))), 16) for d in datas]
    for side, min_share in ((512, 1.0), (256, 0.9)):
        cfg = CurateConfig()
        cfg.hash.draft_side = side
        hashes, _ = hash_images(datas, cfg)
        dists = np.array([bin(int(h) ^ n).count("1") for h, n in zip(hashes, naive)])
        assert (dists <= 2).mean() >= min_share, (side, dists)
    assert gray_thumbnail(datas[0], DecodeConfig(), draft_side=256).size == (32, 32)


def test_degenerate_and_undecodable_flags(imgtools):
    cfg = CurateConfig()
    blank = imgtools.encode(Image.new("RGB", (64, 64), (90, 90, 90)), "PNG")
    hashes, flags = hash_images([blank, b"not an image"], cfg)
    assert flags.tolist() == [3, 0] and hashes[1] == 0
    assert is_degenerate(np.array([0, 2**64 - 1, 0x0F0F0F0F0F0F0F0F], dtype=np.uint64)).tolist() == [True, True, False]


def test_dhash_and_whash_selectable(imgtools):
    photo = imgtools.load_photos(128)["astronaut"].convert("RGB")
    data = imgtools.encode(photo, "PNG")
    for method, fn in (("dhash", imagehash.dhash), ("whash", lambda im: imagehash.whash(im, image_scale=64))):
        cfg = CurateConfig()
        cfg.hash.method = method
        hashes, _ = hash_images([data], cfg)
        gray = photo.convert("L")
        ref = fn(gray.resize((64, 64), Image.Resampling.LANCZOS))
        assert int(hashes[0]) == int(str(ref), 16), method
