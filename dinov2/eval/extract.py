"""Batch feature extraction from a frozen backbone over an image folder or WebDataset shards.

CLI: ``python -m dinov2.eval.extract --weights W --data SRC --output-dir D [--features cls,patch_mean,registers,layers]
[--layers 4] [--format npy|parquet] [--dtype float32|float16] [--image-size 224]``.

Outputs in ``D`` (row i of every file is the same image):
  - ``ids.parquet``: ``id`` (0..n-1), ``key`` (path relative to the folder, or the WebDataset key), ``location``
    (image file, or the shard holding it; both escaped by ``dinov2.io.files.escape_name`` when not UTF-8),
    ``label`` (class-folder index or ``.cls``; -1 when unlabelled),
    ``valid`` (False for an unreadable image, whose features are zeros);
  - ``--format npy``: one ``<kind>.npy`` per kind: ``cls`` (n, D), ``patch_mean`` (n, D), ``registers`` (n, R, D),
    ``layers`` (n, L, D) = class tokens of the last L blocks, oldest first (see :mod:`dinov2.eval.features`);
  - ``--format parquet``: ``features.parquet`` with ``id`` and one fixed-size list column per kind (flattened; the
    original shapes are in the schema metadata under ``shapes``);
  - ``extract.json``: the arguments, feature shapes and counts.

Every file is written under a temporary name and renamed only once all of them are complete
(:mod:`dinov2.io.atomic`), so a crashed run never leaves a plausible output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dinov2.eval.datasets import LabelledImages, open_images
from dinov2.eval.features import FEATURE_KINDS, iter_features, pick_device
from dinov2.io.atomic import atomic_path, write_text_atomic
from dinov2.io.cli import add_image_arguments, add_model_arguments, run_cli, tool_parser
from dinov2.io.files import escape_name

logger = logging.getLogger("dinov2")


def feature_shapes(model: torch.nn.Module, kinds: list[str], n_layers: int) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each kind for ``model``."""
    D, R = model.embed_dim, model.num_register_tokens
    shapes = {"cls": (D,), "patch_mean": (D,), "registers": (R, D), "layers": (n_layers, D)}
    return {k: shapes[k] for k in kinds}


def write_ids(data: LabelledImages, valid: np.ndarray, path: Path) -> None:
    """``ids.parquet`` (module docstring) for ``data`` and the validity mask (n,) bool."""
    n = len(data)
    table = pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64)),
        # Names that are not UTF-8 are escaped losslessly (dinov2.io.files.unescape_name gives them back).
        "key": pa.array([escape_name(data.source.key(i)) for i in range(n)], pa.string()),
        "location": pa.array([escape_name(data.location(i)) for i in range(n)], pa.string()),
        "label": pa.array(data.labels.numpy().astype(np.int64)),
        "valid": pa.array(valid.astype(bool)),
    })  # fmt: skip
    pq.write_table(table, path)


class _NpyWriter:
    """One ``.npy`` memmap per kind at the (temporary) ``paths``, filled batch by batch."""

    def __init__(self, paths: dict[str, Path], shapes: dict[str, tuple[int, ...]], n: int, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.arrays: dict[str, np.ndarray] = {}
        for kind, path in paths.items():
            shape = (n, *shapes[kind])
            if 0 in shape:  # e.g. registers of a model without any: numpy cannot memory-map an empty array
                with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the name
                    np.save(f, np.zeros(shape, dtype), allow_pickle=False)
            else:
                self.arrays[kind] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def write(self, start: int, feats: dict[str, torch.Tensor]) -> None:
        for kind, array in self.arrays.items():
            array[start : start + len(feats[kind])] = feats[kind].numpy().astype(self.dtype)

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()  # drop the memmaps before their files are renamed


class _ParquetWriter:
    """``features.parquet`` at the (temporary) ``path``: ``id`` plus one flattened fixed-size list column per kind."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> None:
        self.dtype = dtype
        self.path = path
        value_type = pa.float32() if dtype == np.float32 else pa.float16()
        fields = [pa.field("id", pa.int64())]
        fields += [pa.field(k, pa.list_(value_type, int(np.prod(shape)))) for k, shape in shapes.items()]
        schema = pa.schema(fields, metadata={"shapes": json.dumps({k: list(v) for k, v in shapes.items()})})
        self.writer = pq.ParquetWriter(self.path, schema)

    def write(self, start: int, feats: dict[str, torch.Tensor]) -> None:
        b = len(next(iter(feats.values())))
        columns = {"id": pa.array(np.arange(start, start + b, dtype=np.int64))}
        for kind, value in feats.items():
            flat = value.numpy().astype(self.dtype).reshape(b, -1)
            columns[kind] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        self.writer.write_table(pa.table(columns, schema=self.writer.schema))

    def close(self) -> None:
        self.writer.close()


def extract_to_dir(
    model: torch.nn.Module,
    data: LabelledImages,
    output_dir: str | Path,
    kinds: list[str],
    n_layers: int = 4,
    fmt: str = "npy",
    dtype: str = "float32",
    image_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict:
    """Extract ``kinds`` for every image of ``data`` into ``output_dir``; returns the ``extract.json`` summary."""
    if fmt not in ("npy", "parquet"):
        raise ValueError(f"--format must be npy or parquet, got {fmt!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown feature kinds {unknown}; valid: {','.join(FEATURE_KINDS)}")
    depth = len(model.real_blocks())
    if "layers" in kinds and not 1 <= n_layers <= depth:
        raise ValueError(f"--layers {n_layers} but the backbone has {depth} blocks")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(data)
    shapes = feature_shapes(model, kinds, n_layers)
    np_dtype = np.dtype(dtype)
    names = [f"{k}.npy" for k in kinds] if fmt == "npy" else ["features.parquet"]
    with ExitStack() as outputs:  # every file is renamed into place only when the block completes
        tmp = {name: outputs.enter_context(atomic_path(out / name)) for name in [*names, "ids.parquet"]}
        if fmt == "npy":
            writer = _NpyWriter({k: tmp[f"{k}.npy"] for k in kinds}, shapes, n, np_dtype)
        else:
            writer = _ParquetWriter(tmp["features.parquet"], shapes, np_dtype)
        valid = np.zeros(n, dtype=bool)
        for start, feats, ok in iter_features(model, data, image_size, kinds, n_layers, batch_size, num_workers):
            valid[start : start + len(ok)] = ok.numpy()
            writer.write(start, feats)
        writer.close()
        write_ids(data, valid, tmp["ids.parquet"])
    summary = {
        "n_images": n,
        "n_unreadable": int((~valid).sum()),
        "features": {k: [n, *v] for k, v in shapes.items()},
        "format": fmt,
        "dtype": dtype,
        "image_size": image_size,
        "layers": n_layers if "layers" in kinds else None,
        "classes": data.classes,
    }
    write_text_atomic(out / "extract.json", json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m dinov2.eval.extract", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="image folder, .tar shards (glob/braces) or a .txt list")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--features", default="cls,patch_mean", help=f"comma list of {','.join(FEATURE_KINDS)}")
    parser.add_argument("--layers", type=int, default=4, help="last blocks whose class tokens 'layers' holds")
    parser.add_argument("--format", default="npy", choices=("npy", "parquet"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    add_image_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    from dinov2.weights import load_backbone

    kinds = [k.strip() for k in args.features.split(",") if k.strip()]
    model = load_backbone(args.weights, num_heads=args.num_heads).to(pick_device(args.device))
    summary = extract_to_dir(
        model, open_images(args.data), args.output_dir, kinds, args.layers, args.format, args.dtype, args.image_size,
        args.batch_size, args.num_workers,
    )  # fmt: skip
    print(json.dumps({k: summary[k] for k in ("n_images", "n_unreadable", "features")}, indent=2))


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
