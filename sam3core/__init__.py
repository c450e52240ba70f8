"""sam3core: SAM 3's and SAM 3.1's vision-language backbones in plain PyTorch.

A model library: no Ray, and no I/O beyond reading a checkpoint.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Each public name and the module it lives in. They are imported on first use (PEP 562), so that code needing only a
# torch-free module (`sam3core.config`) does not pay for importing torch: a run's driver plans the run and refuses
# bad input without it (about 1.9 s of every start on the CPUs of docs/benchmarks.md).
_EXPORTS = {
    "build_sam3_vl_backbone": "build",
    "CheckpointError": "checkpoint",
    "CONFIGS": "config",
    "Sam3Config": "config",
    "TextConfig": "config",
    "VisionConfig": "config",
    "get_config": "config",
    "Sam3DualViTDetNeck": "neck",
    "PositionEmbeddingSine": "position_encoding",
    "normalize_images": "preprocess",
    "preprocess_images": "preprocess",
    "resize_image": "resize",
    "Sam3Tokenizer": "tokenizer",
    "VocabularyError": "tokenizer",
    "Sam3TriViTDetNeck": "tri_neck",
    "ViT": "vit",
    "SAM3VLBackbone": "vl_backbone",
    "SAM3VLBackboneTri": "vl_backbone_tri",
}

if TYPE_CHECKING:
    from .build import build_sam3_vl_backbone
    from .checkpoint import CheckpointError
    from .config import CONFIGS, Sam3Config, TextConfig, VisionConfig, get_config
    from .neck import Sam3DualViTDetNeck
    from .position_encoding import PositionEmbeddingSine
    from .preprocess import normalize_images, preprocess_images
    from .resize import resize_image
    from .tokenizer import Sam3Tokenizer, VocabularyError
    from .tri_neck import Sam3TriViTDetNeck
    from .vit import ViT
    from .vl_backbone import SAM3VLBackbone
    from .vl_backbone_tri import SAM3VLBackboneTri


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "CONFIGS",
    "CheckpointError",
    "PositionEmbeddingSine",
    "SAM3VLBackbone",
    "SAM3VLBackboneTri",
    "Sam3Config",
    "Sam3DualViTDetNeck",
    "Sam3Tokenizer",
    "Sam3TriViTDetNeck",
    "TextConfig",
    "ViT",
    "VisionConfig",
    "VocabularyError",
    "build_sam3_vl_backbone",
    "get_config",
    "normalize_images",
    "preprocess_images",
    "resize_image",
]
