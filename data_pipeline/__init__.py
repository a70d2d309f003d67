"""LVD-style curation pipeline: ingest and safe decode, exact, perceptual-hash and copy-detection dedup, evaluation-set
decontamination, self-supervised embeddings, k-means and retrieval, WebDataset shards and a report (ARCHITECTURE.md).
"""

from data_pipeline.core.config import CurateConfig, load_config

__all__ = ["CurateConfig", "load_config"]
