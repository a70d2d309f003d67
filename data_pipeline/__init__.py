"""LVD-style curation pipeline: ingest, safe decode, exact and perceptual-hash dedup (see ARCHITECTURE.md)."""

from data_pipeline.core.config import CurateConfig, load_config

__all__ = ["CurateConfig", "load_config"]
