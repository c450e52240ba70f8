"""Image preprocessing identical to the official SAM 3 processor.

uint8 RGB -> resized to imgsz x imgsz (aspect ratio not kept, bilinear with antialias, still uint8)
-> scaled to [0, 1] -> normalized with mean 0.5 and std 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .resize import ImageLike, resize_image


def normalize_images(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [-1, 1]."""
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch [B, S, S, 3], got {batch.dtype} {list(batch.shape)}")
    x = batch.permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def preprocess_images(images: Sequence[ImageLike], imgsz: int) -> torch.Tensor:
    """PIL images or uint8 arrays -> the model's input, float32 [B, 3, imgsz, imgsz]."""
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    batch = np.stack([resize_image(image, imgsz) for image in images])
    return normalize_images(torch.from_numpy(batch))
