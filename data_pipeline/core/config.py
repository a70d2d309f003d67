"""Typed curation config: dataclasses, YAML files holding only differences, dotted overrides, one-line errors.

Loading is `dinov2.io.yaml_config`, shared with the training CLI.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from dinov2.io.yaml_config import ConfigError, load_typed_config

__all__ = ["ConfigError", "CurateConfig", "load_config"]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
HASH_METHODS = ("phash", "dhash", "whash")
INDEX_KINDS = ("auto", "flat", "multihash")
EXECUTOR_KINDS = ("local", "slurm")
EMBEDDER_KINDS = ("torchscript", "dinov2")
EMBED_DEVICES = ("auto", "cpu", "cuda")
KNN_INDEX_KINDS = ("auto", "flat", "ivf", "ivfsq8", "ivfpq")
FAISS_DEVICES = ("auto", "cpu", "gpu")
CLUSTER_MODES = ("kmeans", "hierarchical")
CLUSTER_INITS = ("kmeans++", "afkmc2", "random")
RETRIEVAL_MODES = ("as_is", "sample", "cluster")
GIANT_ACTIONS = ("split", "flag")


def _check_giant(section: str, fraction: float, min_size: int, action: str) -> None:
    """Shared validation of the giant-component keys of the hash and copy_dedup sections."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{section}.giant_fraction must be in (0, 1], got {fraction}")
    if min_size < 2:
        raise ValueError(f"{section}.giant_min_size must be >= 2, got {min_size}")
    if action not in GIANT_ACTIONS:
        raise ValueError(f"{section}.giant_action must be one of {list(GIANT_ACTIONS)}, got {action!r}")


def _check_margin(section: str, margin: float) -> None:
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"{section}.audit_margin must be in (0, 1], got {margin}")
SET_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _at_least(prefix: str, minimum: float, **values: float) -> None:
    """ValueError naming the first `prefix.key` whose value is below `minimum` (or not a finite number)."""
    for key, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
            raise ValueError(f"{prefix}.{key} must be >= {minimum:g}, got {value!r}")


def _within(key: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{key} must be in [{lo:g}, {hi:g}], got {value!r}")


@dataclass
class IngestConfig:
    """Where images come from and how the manifest is split into shards."""

    sources: list[str] = field(default_factory=list)
    shard_size: int = 256

    def __post_init__(self) -> None:
        _at_least("ingest", 1, shard_size=self.shard_size)
        for k, source in enumerate(self.sources):
            if not str(source).strip():
                raise ValueError(f"ingest.sources[{k}] is empty")


@dataclass
class DecodeConfig:
    """Decode and validation limits for untrusted images."""

    formats: list[str] = field(default_factory=lambda: list(ALLOWED_FORMATS))
    max_pixels: int = 40_000_000
    min_size: int = 32
    max_aspect_ratio: float = 10.0
    item_timeout_s: float = 20.0
    worker_memory_mb: int = 4096

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in ALLOWED_FORMATS]
        if bad:
            raise ValueError(f"decode.formats: {bad} not in the allowlist {list(ALLOWED_FORMATS)}")
        _at_least("decode", 1, max_pixels=self.max_pixels, min_size=self.min_size,
                  max_aspect_ratio=self.max_aspect_ratio)
        _at_least("decode", 0, item_timeout_s=self.item_timeout_s, worker_memory_mb=self.worker_memory_mb)


@dataclass
class HashConfig:
    """Perceptual hashing and near-duplicate search."""

    method: str = "phash"
    draft_side: int = 512
    threshold: int = 4
    index: str = "auto"
    flat_max: int = 200_000
    skip_degenerate: bool = True
    threads: int = 2
    giant_fraction: float = 0.01
    giant_min_size: int = 32
    giant_action: str = "split"
    slice_rows: int = 1 << 20  # query hashes per near-duplicate search slice (one SLURM array task each)

    def __post_init__(self) -> None:
        _check_giant("hash", self.giant_fraction, self.giant_min_size, self.giant_action)
        if self.method not in HASH_METHODS:
            raise ValueError(f"hash.method must be one of {list(HASH_METHODS)}, got {self.method!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"hash.index must be one of {list(INDEX_KINDS)}, got {self.index!r}")
        if self.draft_side < 0:
            raise ValueError(f"hash.draft_side must be >= 0 (0 = full decode), got {self.draft_side}")
        if not 0 <= self.threshold < 32:
            raise ValueError(f"hash.threshold must be in [0, 32), got {self.threshold}")
        _at_least("hash", 1, flat_max=self.flat_max, threads=self.threads, slice_rows=self.slice_rows)


@dataclass
class ExecutorConfig:
    """How shards are mapped: a local process pool or a SLURM job array through submitit.

    The array tasks' resources come from cluster YAML files in the schema every SLURM job of the project uses
    (`dinov2.run.slurm.KMeansConfig`); only what that schema does not cover is a key here.
    """

    kind: str = "local"
    workers: int = 0
    max_retries: int = 1
    slurm_files: list[str] = field(default_factory=lambda: ["slurm/curate_array.yaml"])
    slurm_partition: str = ""
    slurm_shards_per_task: int = 4

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ValueError(f"executor.kind must be one of {list(EXECUTOR_KINDS)}, got {self.kind!r}")
        _at_least("executor", 0, workers=self.workers, max_retries=self.max_retries)
        _at_least("executor", 1, slurm_shards_per_task=self.slurm_shards_per_task)


@dataclass
class EmbedConfig:
    """Embedding models: copy detection (`copy_*`, SSCD contract) and self-supervised retrieval (`ssl_*`)."""

    copy_model: str = ""
    copy_kind: str = "torchscript"
    copy_resize: int = 288
    ssl_model: str = ""
    ssl_kind: str = "dinov2"
    ssl_resolution: int = 224
    ssl_patch_mean: bool = False
    batch_size: int = 64
    device: str = "auto"
    loader_workers: int = 2
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        for key in ("copy_kind", "ssl_kind"):
            if getattr(self, key) not in EMBEDDER_KINDS:
                raise ValueError(f"embed.{key} must be one of {list(EMBEDDER_KINDS)}, got {getattr(self, key)!r}")
        if self.device not in EMBED_DEVICES:
            raise ValueError(f"embed.device must be one of {list(EMBED_DEVICES)}, got {self.device!r}")
        _at_least("embed", 1, batch_size=self.batch_size, chunk_size=self.chunk_size, copy_resize=self.copy_resize,
                  ssl_resolution=self.ssl_resolution)
        _at_least("embed", 0, loader_workers=self.loader_workers)


@dataclass
class CopyDedupConfig:
    """Copy-detection dedup: kNN graph over copy embeddings, edges above a cosine threshold, components."""

    k: int = 64
    threshold: float = 0.6
    index: str = "auto"
    flat_max: int = 200_000
    memory_budget_gb: float = 4.0
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 32
    pq_fast_scan: bool = True  # IVF-PQ on the CPU as 2 * pq_m 4-bit fast-scan codes (same bytes; GPUs: 8-bit)
    rerank: int = 256
    recall_sample: int = 1000
    audit_margin: float = 0.05
    audit_pairs: int = 200
    threads: int = 2
    device: str = "auto"  # faiss GPUs when present (auto), or cpu / gpu; decontaminate searches the same way
    giant_fraction: float = 0.01
    giant_min_size: int = 32
    giant_action: str = "split"
    slice_rows: int = 65_536  # query rows per kNN slice (one SLURM array task each); decontaminate slices so too

    def __post_init__(self) -> None:
        if self.device not in FAISS_DEVICES:
            raise ValueError(f"copy_dedup.device must be one of {list(FAISS_DEVICES)}, got {self.device!r}")
        _check_giant("copy_dedup", self.giant_fraction, self.giant_min_size, self.giant_action)
        _check_margin("copy_dedup", self.audit_margin)
        if self.index not in KNN_INDEX_KINDS:
            raise ValueError(f"copy_dedup.index must be one of {list(KNN_INDEX_KINDS)}, got {self.index!r}")
        if self.k < 1:
            raise ValueError(f"copy_dedup.k must be >= 1, got {self.k}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"copy_dedup.threshold must be a cosine in [-1, 1], got {self.threshold}")
        _at_least("copy_dedup", 1, flat_max=self.flat_max, nprobe=self.nprobe, pq_m=self.pq_m, rerank=self.rerank,
                  threads=self.threads, slice_rows=self.slice_rows)
        _at_least("copy_dedup", 0, nlist=self.nlist, recall_sample=self.recall_sample, audit_pairs=self.audit_pairs)
        if not self.memory_budget_gb > 0:
            raise ValueError(f"copy_dedup.memory_budget_gb must be > 0, got {self.memory_budget_gb}")


@dataclass
class DecontaminateConfig:
    """Evaluation-set decontamination: pool components touched by an evaluation image are removed."""

    eval_sets: list[str] = field(default_factory=list)
    threshold: float = 0.45
    k: int = 64
    # IVF lists visited per eval image (copy_dedup's index, its own nprobe for its self-search)
    nprobe: int = 256
    audit_margin: float = 0.05
    audit_pairs: int = 200

    def __post_init__(self) -> None:
        _check_margin("decontaminate", self.audit_margin)
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"decontaminate.threshold must be a cosine in [-1, 1], got {self.threshold}")
        _at_least("decontaminate", 1, k=self.k, nprobe=self.nprobe)
        _at_least("decontaminate", 0, audit_pairs=self.audit_pairs)
        for k, entry in enumerate(self.eval_sets):
            parse_eval_set(entry, f"decontaminate.eval_sets[{k}]")


@dataclass
class KMeansConfig:
    """Spherical k-means (flat) or hierarchical k-means with resampling on the retrieval embeddings."""

    mode: str = "kmeans"
    n_clusters: int = 100_000
    iterations: int = 20
    init: str = "kmeans++"
    levels: list[int] = field(default_factory=lambda: [10_000, 1_000, 100])
    resample_steps: int = 10
    resample_size: int = 0
    balanced_size: int = 0
    max_points_per_centroid: int = 256
    memory_budget_gb: float = 4.0
    threads: int = 2
    device: str = "auto"  # k-means assignment on faiss GPUs when present (auto), or cpu / gpu
    # Points per assignment slice (one SLURM array task each). Slice sums are reduced in slice order, so the result
    # depends on this value but not on where the slices ran; a multiple of 65536 keeps faiss' search blocks aligned.
    slice_rows: int = 262_144

    def __post_init__(self) -> None:
        if self.device not in FAISS_DEVICES:
            raise ValueError(f"cluster.device must be one of {list(FAISS_DEVICES)}, got {self.device!r}")
        if self.mode not in CLUSTER_MODES:
            raise ValueError(f"cluster.mode must be one of {list(CLUSTER_MODES)}, got {self.mode!r}")
        if self.init not in CLUSTER_INITS:
            raise ValueError(f"cluster.init must be one of {list(CLUSTER_INITS)}, got {self.init!r}")
        if self.n_clusters < 1 or self.iterations < 1 or any(k < 1 for k in self.levels):
            raise ValueError("cluster.n_clusters, cluster.iterations and cluster.levels must be >= 1")
        if min(self.resample_steps, self.resample_size, self.balanced_size, self.max_points_per_centroid) < 0:
            raise ValueError("cluster.resample_*, balanced_size and max_points_per_centroid must be >= 0")
        _at_least("cluster", 1, threads=self.threads, slice_rows=self.slice_rows)
        if not self.memory_budget_gb > 0:
            raise ValueError(f"cluster.memory_budget_gb must be > 0, got {self.memory_budget_gb}")


@dataclass
class SeedSetConfig:
    """One curated seed set and how pool images are retrieved for it."""

    name: str = ""
    sources: list[str] = field(default_factory=list)
    mode: str = "sample"
    n_neighbors: int = 4
    min_similarity: float = -1.0
    per_cluster: int = 10_000
    min_seeds_in_cluster: int = 3
    max_images: int = 1_000_000

    def check(self, key: str) -> None:
        """ValueError naming `key.<field>` for the first bad value (`key` is e.g. `retrieve.seed_sets[0]`)."""
        if not SET_NAME.match(self.name):
            raise ValueError(f"{key}.name {self.name!r} must be a non-empty safe file-name fragment (letters, digits, "
                             "_ . + -)")
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"{key}.mode must be one of {list(RETRIEVAL_MODES)}, got {self.mode!r}")
        _at_least(key, 1, n_neighbors=self.n_neighbors, per_cluster=self.per_cluster, max_images=self.max_images)
        _at_least(key, 0, min_seeds_in_cluster=self.min_seeds_in_cluster)
        _within(f"{key}.min_similarity", self.min_similarity, -1.0, 1.0)


@dataclass
class RetrieveConfig:
    """Curated seed sets; the union of what they retrieve (plus any balanced sample) is the selection."""

    seed_sets: list[SeedSetConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        for k, seed_set in enumerate(self.seed_sets):
            seed_set.check(f"retrieve.seed_sets[{k}]")
        names = [s.name for s in self.seed_sets]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"retrieve.seed_sets: duplicate names {dups}")


@dataclass
class ShardsConfig:
    """WebDataset tar shards of the selected images."""

    prefix: str = "curated"
    max_count: int = 10_000
    max_bytes: int = 1_000_000_000
    reencode: bool = False
    quality: int = 90
    max_side: int = 0

    def __post_init__(self) -> None:
        _at_least("shards", 1, max_count=self.max_count, max_bytes=self.max_bytes)
        _at_least("shards", 0, max_side=self.max_side)
        _within("shards.quality", self.quality, 1, 100)
        if not SET_NAME.match(self.prefix):
            raise ValueError(f"shards.prefix {self.prefix!r} must be a non-empty safe file-name fragment")


@dataclass
class ReportConfig:
    """HTML report: how many examples of each kind to show."""

    dup_examples: int = 8
    retrieval_examples: int = 6
    thumb_size: int = 128

    def __post_init__(self) -> None:
        _at_least("report", 0, dup_examples=self.dup_examples, retrieval_examples=self.retrieval_examples)
        _at_least("report", 1, thumb_size=self.thumb_size)


@dataclass
class CurateConfig:
    """Top-level curation config (at most two levels deep)."""

    stages: list[str] = field(default_factory=list)
    seed: int = 0
    ingest: IngestConfig = field(default_factory=IngestConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    copy_dedup: CopyDedupConfig = field(default_factory=CopyDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    cluster: KMeansConfig = field(default_factory=KMeansConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def parse_eval_set(entry: str, key: str = "decontaminate.eval_sets") -> tuple[str, str]:
    """`"name=path"` -> (name, path); a bare path is named by its basename.

    Raises:
        ValueError: naming `key` when the name is empty or not a safe file-name fragment.
    """
    name, sep, path = entry.partition("=")
    if not sep:
        name, path = Path(entry.rstrip("/")).name, entry
    if not SET_NAME.match(name) or not path:
        raise ValueError(f"{key}: bad entry {entry!r}: give name=path, name of letters, digits, _ . + -")
    return name, path


# The paths each stage reads, by config key; checked before the first stage runs (`check_paths`).
def _stage_paths(cfg: CurateConfig) -> dict[str, list[tuple[str, str]]]:
    """stage -> [(config key, path)]: sources (folder, .tar or file list) and model files or folders."""
    e = cfg.embed
    evals = [(f"decontaminate.eval_sets[{k}]", parse_eval_set(entry)[1])
             for k, entry in enumerate(cfg.decontaminate.eval_sets)]
    seeds = [(f"retrieve.seed_sets[{k}].sources[{j}]", src)
             for k, s in enumerate(cfg.retrieve.seed_sets) for j, src in enumerate(s.sources)]
    return {
        "ingest": [(f"ingest.sources[{k}]", src) for k, src in enumerate(cfg.ingest.sources)],
        "embed_copy": [("embed.copy_model", e.copy_model), *evals],
        "decontaminate": evals,
        "embed_ssl": [("embed.ssl_model", e.ssl_model), *seeds],
        "retrieve": seeds,
    }


def _path_problem(path: str) -> str:
    """Why `path` cannot be read as a folder or file ('' when it can). Only `stat` is called: nothing is opened."""
    if not path:
        return "is empty: set it (see configs/curate/default.yaml)"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path!r}: {exc.strerror.lower() if exc.strerror else 'cannot be read'}"
    except ValueError:
        return f"{path!r}: not a valid path"
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
        return f"{path!r} is not a regular file or folder (a FIFO, socket or device is never read)"
    return ""


def check_paths(cfg: CurateConfig, stages: list[str]) -> None:
    """Every path the given stages read exists and is a folder or regular file; ingest needs at least one source.

    Raises:
        ValueError: one line naming the config key.
    """
    if "ingest" in stages and not cfg.ingest.sources:
        raise ValueError("ingest.sources is empty: give at least one folder, .tar or file list")
    if "embed_ssl" in stages:
        for k, seed_set in enumerate(cfg.retrieve.seed_sets):
            if not seed_set.sources:
                raise ValueError(f"retrieve.seed_sets[{k}].sources is empty: give at least one folder, .tar or list")
    wanted = _stage_paths(cfg)
    for stage in stages:
        for key, path in wanted.get(stage, []):
            problem = _path_problem(path)
            if problem:
                raise ValueError(f"{key}: {problem}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
    """Build a validated config from the defaults, an optional YAML of differences, and `key=value` overrides.

    Raises:
        ConfigError: (a ValueError) one line naming the offending key (unknown key, wrong type, bad value) or file.
    """
    return load_typed_config(CurateConfig, [] if path is None else [path], overrides or [])


def config_to_yaml(cfg: CurateConfig) -> str:
    """Resolved config as YAML text (stable key order)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section_dict(cfg: CurateConfig, *names: str) -> dict:
    """Plain-dict view of the named config sections, for fingerprints and worker payloads."""
    # Top-level scalars such as `seed` are sections too: they change results just the same.
    return {n: dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(cfg, n)) else v for n in names}


def describe_keys() -> list[str]:
    """Every dotted config key with its default, for `--help`."""
    lines = []
    for f in dataclasses.fields(CurateConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(default):
                lines.append(f"{f.name}.{sub.name}={getattr(default, sub.name)!r}")
        else:
            lines.append(f"{f.name}={default!r}")
    return lines
