"""sam3core: SAM 3's and SAM 3.1's vision-language backbones in plain PyTorch.

A model library: no Ray, and no I/O beyond reading a checkpoint.
"""

from .build import build_sam3_vl_backbone
from .checkpoint import CheckpointError
from .config import CONFIGS, Sam3Config, TextConfig, VisionConfig, get_config
from .neck import Sam3DualViTDetNeck
from .position_encoding import PositionEmbeddingSine
from .preprocess import normalize_images, preprocess_images, resize_image
from .tokenizer import Sam3Tokenizer, VocabularyError
from .tri_neck import Sam3TriViTDetNeck
from .vit import ViT
from .vl_backbone import SAM3VLBackbone
from .vl_backbone_tri import SAM3VLBackboneTri

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
