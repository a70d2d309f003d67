"""Typed curation config: dataclasses, YAML files holding only differences, dotted overrides, one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
HASH_METHODS = ("phash", "dhash", "whash")
INDEX_KINDS = ("auto", "flat", "multihash")
EXECUTOR_KINDS = ("local", "slurm")
EMBEDDER_KINDS = ("torchscript", "dinov2")
EMBED_DEVICES = ("auto", "cpu", "cuda")
KNN_INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
FAISS_DEVICES = ("auto", "cpu", "gpu")
CLUSTER_MODES = ("kmeans", "hierarchical")
CLUSTER_INITS = ("kmeans++", "afkmc2", "random")
RETRIEVAL_MODES = ("as_is", "sample", "cluster")


@dataclass
class IngestConfig:
    """Where images come from and how the manifest is split into shards."""

    sources: list[str] = field(default_factory=list)
    shard_size: int = 256

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"ingest.shard_size must be >= 1, got {self.shard_size}")


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
        if self.max_pixels < 1 or self.min_size < 1 or self.max_aspect_ratio < 1:
            raise ValueError("decode.max_pixels and decode.min_size must be >= 1, decode.max_aspect_ratio >= 1")


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

    def __post_init__(self) -> None:
        if self.method not in HASH_METHODS:
            raise ValueError(f"hash.method must be one of {list(HASH_METHODS)}, got {self.method!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"hash.index must be one of {list(INDEX_KINDS)}, got {self.index!r}")
        if self.draft_side < 0:
            raise ValueError(f"hash.draft_side must be >= 0 (0 = full decode), got {self.draft_side}")
        if not 0 <= self.threshold < 32:
            raise ValueError(f"hash.threshold must be in [0, 32), got {self.threshold}")


@dataclass
class ExecutorConfig:
    """How shards are mapped: a local process pool or a SLURM job array through submitit."""

    kind: str = "local"
    workers: int = 0
    max_retries: int = 1
    slurm_config: str = "slurm/curate_array.yaml"
    slurm_partition: str = ""
    slurm_timeout_min: int = 60
    slurm_cpus_per_task: int = 2
    slurm_mem_gb: int = 8
    slurm_shards_per_task: int = 4
    slurm_array_parallelism: int = 64

    def __post_init__(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ValueError(f"executor.kind must be one of {list(EXECUTOR_KINDS)}, got {self.kind!r}")
        if self.workers < 0 or self.max_retries < 0:
            raise ValueError("executor.workers and executor.max_retries must be >= 0")


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
        if self.batch_size < 1 or self.chunk_size < 1 or self.loader_workers < 0:
            raise ValueError("embed.batch_size and embed.chunk_size must be >= 1, embed.loader_workers >= 0")


@dataclass
class CopyDedupConfig:
    """Copy-detection dedup: kNN graph over copy embeddings, edges above a cosine threshold, components."""

    k: int = 64
    threshold: float = 0.6
    index: str = "auto"
    flat_max: int = 200_000
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 32
    rerank: int = 256
    recall_sample: int = 1000
    audit_low: float = 0.55
    audit_high: float = 0.65
    audit_pairs: int = 200
    threads: int = 2
    device: str = "auto"  # faiss GPUs when present (auto), or cpu / gpu; decontaminate searches the same way

    def __post_init__(self) -> None:
        if self.device not in FAISS_DEVICES:
            raise ValueError(f"copy_dedup.device must be one of {list(FAISS_DEVICES)}, got {self.device!r}")
        if self.index not in KNN_INDEX_KINDS:
            raise ValueError(f"copy_dedup.index must be one of {list(KNN_INDEX_KINDS)}, got {self.index!r}")
        if self.k < 1:
            raise ValueError(f"copy_dedup.k must be >= 1, got {self.k}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"copy_dedup.threshold must be a cosine in [-1, 1], got {self.threshold}")


@dataclass
class DecontaminateConfig:
    """Evaluation-set decontamination: pool components touched by an evaluation image are removed."""

    eval_sets: list[str] = field(default_factory=list)
    threshold: float = 0.45
    k: int = 64

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"decontaminate.threshold must be a cosine in [-1, 1], got {self.threshold}")


@dataclass
class ClusterConfig:
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
    threads: int = 2
    device: str = "auto"  # k-means assignment on faiss GPUs when present (auto), or cpu / gpu

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

    def __post_init__(self) -> None:
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieve.seed_sets mode must be one of {list(RETRIEVAL_MODES)}, got {self.mode!r}")


@dataclass
class RetrieveConfig:
    """Curated seed sets; the union of what they retrieve (plus any balanced sample) is the selection."""

    seed_sets: list[SeedSetConfig] = field(default_factory=list)


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
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("shards.max_count and shards.max_bytes must be >= 1")


@dataclass
class ReportConfig:
    """HTML report: how many examples of each kind to show."""

    dup_examples: int = 8
    retrieval_examples: int = 6
    thumb_size: int = 128


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _clean_omegaconf_error(exc: OmegaConfBaseException) -> ValueError:
    key = getattr(exc, "full_key", None)
    head = _first_line(exc)
    return ValueError(f"config key '{key}': {head}" if key else f"config error: {head}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
    """Build a validated config from the defaults, an optional YAML of differences, and `key=value` overrides.

    Raises:
        ValueError: one line naming the offending key (unknown key, wrong type, bad value).
    """
    try:
        merged = OmegaConf.structured(CurateConfig)
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _clean_omegaconf_error(exc) from None
    except ValueError as exc:
        # __post_init__ validation errors can come wrapped in multi-line OmegaConf text.
        raise ValueError(_first_line(exc)) from None
    assert isinstance(cfg, CurateConfig)
    return cfg


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
