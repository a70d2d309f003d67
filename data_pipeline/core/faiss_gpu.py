"""Faiss on GPUs when present: device choice, moving indexes to every GPU, and the one-faiss-build check.

`device` (config keys `copy_dedup.device`, `cluster.device`): `cpu`, `gpu` (an error when faiss sees none) or
`auto` (GPUs when the installed faiss has GPU support and sees at least one). Indexes go to all GPUs: replicated
(each GPU a full copy, queries split between them) when the index takes at most `REPLICATE_FRACTION` of the
smallest GPU's free memory, sharded (base vectors split, results merged) otherwise.

What stays the same on GPU: every similarity the kNN search returns is re-scored exactly on the CPU from the stored
vectors (`knn.exact_scores`), so a pair found on both devices has the same float32 bits. What may differ: the
candidate set where two neighbours' similarities are within float32 rounding of each other at the k-th place (GPU
and CPU sum in different orders, relative error ~1e-6), IVF lists probed when a query is that close to two
coarse centroids, and k-means labels of points that close to two centroids (hence centroids within ~1e-5 after
several iterations). Faiss guarantees bitwise equality only on one device with a fixed thread count.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Iterable

import faiss

DEVICES = ("auto", "cpu", "gpu")
REPLICATE_FRACTION = 0.5


def faiss_distributions(dists: Iterable[importlib.metadata.Distribution] | None = None) -> list[str]:
    """Names of the installed distributions that ship the `faiss` package (faiss-cpu, faiss-gpu-cu12, ...).

    Args:
        dists: distributions to look at (default: all installed ones).
    """
    names = set()
    for dist in dists if dists is not None else importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        top_level = (dist.read_text("top_level.txt") or "").split()
        if "faiss" in top_level:
            names.add(name)
        elif "faiss" in name.lower():  # RECORD is read only for likely names: parsing every one is slow
            if any(f.parts[:1] == ("faiss",) and f.name == "__init__.py" for f in dist.files or []):
                names.add(name)
    return sorted(names)


def check_single_faiss(dists: Iterable[importlib.metadata.Distribution] | None = None) -> str:
    """The one installed faiss distribution's name.

    Raises:
        RuntimeError: when several distributions ship `faiss` (e.g. faiss-cpu next to faiss-gpu-cu12: whichever
            was installed last overwrote the other's files, so the module is a mix of both).
    """
    found = faiss_distributions(dists)
    if len(found) > 1:
        raise RuntimeError(f"several faiss builds are installed ({', '.join(found)}); they share the faiss module "
                           f"and clash. Keep one: pip uninstall -y {' '.join(n for n in found if 'gpu' not in n)} "
                           f"(GPU machines) or the GPU build (CPU machines), then reinstall the one kept.")
    return found[0] if found else ""


@functools.cache
def _checked_installation() -> str:
    return check_single_faiss()


def gpu_count() -> int:
    """GPUs this faiss build can use (0 for a CPU-only build)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a GPU build on a machine without a usable driver
        return 0


def use_gpu(device: str) -> bool:
    """Whether faiss work configured with `device` runs on GPUs (checks the faiss installation once per process).

    Raises:
        ValueError: unknown device; RuntimeError: `gpu` without a usable GPU, or clashing faiss builds.
    """
    if device not in DEVICES:
        raise ValueError(f"faiss device must be one of {list(DEVICES)}, got {device!r}")
    _checked_installation()
    if device == "cpu":
        return False
    n = gpu_count()
    if device == "gpu" and n == 0:
        build = "a CPU-only faiss build" if not hasattr(faiss, "StandardGpuResources") else "no GPU visible to faiss"
        raise RuntimeError(f"device=gpu, but {build} is installed/available; use device=auto or cpu")
    return n > 0


@functools.cache
def _resources() -> tuple:
    # One StandardGpuResources per GPU for the whole process: each reserves scratch memory and creating one per
    # call (every k-means iteration) would cost far more than the search.
    return tuple(faiss.StandardGpuResources() for _ in range(gpu_count()))


def free_gpu_memory() -> int:
    """Free bytes on the GPU with the least free memory (0 when it cannot be read: then indexes are sharded)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return 0
        return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except (ImportError, RuntimeError):
        return 0


def shard_decision(index_bytes: int, n_gpus: int, free_bytes: int) -> bool:
    """Shard (True) or replicate (False) an index of `index_bytes` over `n_gpus` GPUs with `free_bytes` free on the
    fullest one: replicate while a full copy takes at most REPLICATE_FRACTION of it."""
    return n_gpus > 1 and index_bytes > REPLICATE_FRACTION * free_bytes


def to_gpus(index: faiss.Index, index_bytes: int) -> faiss.Index:
    """A copy of a CPU `index` on every GPU (replicated or sharded by size; see the module docstring).

    Args:
        index: a CPU index (trained; it may be empty and be filled on the GPUs).
        index_bytes: the size it will have once filled (drives replicate vs shard).
    """
    resources = _resources()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard_decision(index_bytes, len(resources), free_gpu_memory())
    options.useFloat16 = False  # float32 storage: the same vectors as on the CPU
    options.useFloat16LookupTables = True  # IVF-PQ with many sub-quantizers needs it; codes are unchanged
    if len(resources) == 1:
        return faiss.index_cpu_to_gpu(resources[0], 0, index, options)
    return faiss.index_cpu_to_gpu_multiple_py(list(resources), index, options)


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The CPU form of an index that may live on GPUs (for serialisation)."""
    if hasattr(faiss, "index_gpu_to_cpu") and gpu_count() > 0:
        try:
            return faiss.index_gpu_to_cpu(index)
        except RuntimeError:  # already a CPU index
            return index
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """nprobe on a CPU or GPU IVF index, including replicated / sharded ones (whose sub-indexes hold it)."""
    if hasattr(faiss, "GpuParameterSpace") and gpu_count() > 0:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
