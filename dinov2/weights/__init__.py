"""Weight compatibility: read official hub, training, timm and Hugging Face checkpoints; export to each layout."""

from dinov2.weights.arch import BackboneSpec, infer_spec, official_shapes
from dinov2.weights.formats import detect_layout
from dinov2.weights.load import (
    extract_backbone,
    load_backbone,
    load_backbone_weights,
    load_into,
    load_state,
    read_weights,
    resize_pos_embed,
)

__all__ = [
    "BackboneSpec",
    "detect_layout",
    "export_backbone",
    "extract_backbone",
    "infer_spec",
    "load_backbone",
    "load_backbone_weights",
    "load_into",
    "load_state",
    "official_shapes",
    "read_weights",
    "resize_pos_embed",
]


def __getattr__(name: str):
    # Imported lazily so that ``python -m dinov2.weights.export`` does not find its module pre-imported (runpy warning).
    if name == "export_backbone":
        from dinov2.weights.export import export_backbone

        return export_backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
