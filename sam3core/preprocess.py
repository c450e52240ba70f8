"""Image preprocessing identical to the official SAM 3 processor.

uint8 RGB -> resized to imgsz x imgsz (aspect ratio not kept, bilinear with antialias, still uint8)
-> scaled to [0, 1] -> normalized with mean 0.5 and std 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Image.Image | np.ndarray


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """[H, W, 3] uint8 from a PIL image (any mode) or a uint8 array ([H, W], [H, W, 1], [H, W, 3], [H, W, 4])."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]


def resize_image(image: ImageLike, imgsz: int) -> np.ndarray:
    """[imgsz, imgsz, 3] uint8, resized as torchvision's v2.Resize does for uint8 tensors on the CPU."""
    chw = torch.from_numpy(np.ascontiguousarray(as_rgb_array(image))).permute(2, 0, 1)[None]
    if chw.shape[-2:] != (imgsz, imgsz):
        chw = F.interpolate(chw, size=(imgsz, imgsz), mode="bilinear", antialias=True, align_corners=False)
    return chw[0].permute(1, 2, 0).contiguous().numpy()


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
