"""The official processor's resize, exact, in NumPy until importing torch for it pays.

SAM 3 resizes uint8 tensors with torchvision, which on the CPU runs torch's integer kernel for antialiased bilinear
resampling (Pillow-SIMD's): per axis, a triangle filter stretched by the scale, its weights normalized in double
precision and rounded to int16 at a precision chosen from the largest weight, the products summed in integers and
rounded back to uint8; the width first, then the height. `resize_with_numpy` computes exactly that, byte for byte
(`tests/test_sam3core.py`), so a process that only decodes images need not import torch: 1.1 to 1.4 s and ~130 MB
in every new decoding worker, which a short run pays in full. Torch's SIMD kernel is 2 to 15 times faster per
image, so `resize_image` moves to it once a process has spent as long in NumPy's resizes as the import costs (at
once where torch is imported already); a long run pays the import once, a short one never.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray

# Seconds of NumPy resizing after which a process imports torch for the rest: about what the import costs (1.1 to
# 1.4 s on the CPUs of docs/benchmarks.md), so that neither choice costs more than twice the better one.
TORCH_AFTER_SECONDS = 1.5
_MAX_PRECISION = 22  # torch's bound on the fixed-point bits of the weights
_INT16_LIMIT = 1 << 15
# Input samples one matrix product spans: it is dense over them, so a small span keeps the work near the filter's
# own, and a large one calls BLAS less often.
_SPAN = 32


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


class _NumpyTime:
    seconds = 0.0  # spent in this process's NumPy resizes


def resize_image(image: ImageLike, imgsz: int) -> np.ndarray:
    """[imgsz, imgsz, 3] uint8, resized as torchvision's v2.Resize does for uint8 tensors on the CPU."""
    pixels = as_rgb_array(image)
    if "torch" in sys.modules or _NumpyTime.seconds >= TORCH_AFTER_SECONDS:
        return resize_with_torch(pixels, imgsz)
    started = time.perf_counter()
    resized = resize_with_numpy(pixels, imgsz)
    _NumpyTime.seconds += time.perf_counter() - started
    return resized


def resize_with_torch(pixels: np.ndarray, imgsz: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [imgsz, imgsz, 3] uint8 through torch's own kernel."""
    import torch
    import torch.nn.functional as F

    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    if chw.shape[-2:] != (imgsz, imgsz):
        chw = F.interpolate(chw, size=(imgsz, imgsz), mode="bilinear", antialias=True, align_corners=False)
    return chw[0].permute(1, 2, 0).contiguous().numpy()


def resize_with_numpy(pixels: np.ndarray, imgsz: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [imgsz, imgsz, 3] uint8, the same arithmetic as torch's kernel."""
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)  # [H, W * 3]: RGB interleaved
    if width != imgsz:
        rows = _resample(rows.T, width, imgsz, channels=3).T  # -> [H, imgsz * 3]
    if height != imgsz:
        rows = _resample(rows, height, imgsz, channels=1)  # -> [imgsz, imgsz * 3]
    return np.ascontiguousarray(rows).reshape(imgsz, imgsz, 3)


def _resample(samples: np.ndarray, length: int, size: int, channels: int) -> np.ndarray:
    """[length * channels, M] uint8 -> [size * channels, M] uint8: the first axis resampled from `length` to `size`
    samples of `channels` interleaved channels (`samples` may be a transposed view: only slices of it are read)."""
    start, weights, precision = fixed_point_weights(length, size)
    taps = weights.shape[1]
    # The products and their sums are integers below 2**31 (torch sums them in int32): exact in float64, and in
    # float32 while the largest sum stays below 2**24.
    exact_in_float32 = 255 * weights.sum(axis=1).max() + (1 << precision) < (1 << 24)
    dtype = np.float32 if exact_in_float32 else np.float64
    half, unit = (1 << precision) // 2, 1 << precision
    identity = np.eye(channels, dtype=dtype)
    out = np.empty((size * channels, samples.shape[1]), dtype=np.uint8)
    tile = max(1, int(_SPAN * size / length))  # outputs per product: about _SPAN inputs at this scale
    for first in range(0, size, tile):
        last = min(first + tile, size)
        lo, hi = int(start[first]), min(int(start[last - 1]) + taps, length)
        # [tile, span]: each output's weights at its input positions (weights past the input's end are zero),
        # then one row per output channel picking the same channel of the inputs
        columns = (start[first:last] - lo)[:, None] + np.arange(taps)
        inside = columns < hi - lo
        band = np.zeros((last - first, hi - lo), dtype=dtype)
        band[np.nonzero(inside)[0], columns[inside]] = weights[first:last][inside]
        sums = np.kron(band, identity) @ samples[lo * channels : hi * channels].astype(dtype)
        out[first * channels : last * channels] = np.clip(np.floor((sums + half) / unit), 0, 255)
    return out


def fixed_point_weights(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output sample: its first input index, its integer filter weights (zero past the filter), their precision.

    start [output_size] int64; weights [output_size, taps] float64 holding integers; precision: the fixed-point
    bits. The arithmetic follows torch's step by step (double precision, truncating casts, weights normalized by a
    sum taken left to right), so that every weight rounds the same way.
    """
    scale = input_size / output_size
    support = scale if scale >= 1.0 else 1.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    centers = scale * (np.arange(output_size) + 0.5)
    start = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), input_size)
    offsets = np.arange(taps)
    distance = (start[:, None] + offsets[None, :] - centers[:, None] + 0.5) * inverse
    inside = offsets[None, :] < (stop - start)[:, None]
    weights = np.where(inside, np.maximum(0.0, 1.0 - np.abs(distance)), 0.0)
    totals = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.divide(weights, totals, out=weights, where=totals != 0)
    largest = weights.max()
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < _INT16_LIMIT:
        precision += 1
    return start, np.trunc(0.5 + weights * (1 << precision)), precision
