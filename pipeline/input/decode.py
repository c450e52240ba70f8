"""Image bytes to model input: decode with Pillow, apply EXIF orientation, convert to RGB, resize.

Every failure is returned as a reason string, never raised: one bad file must not stop a job.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam3core import resize_image

# `<_io.BytesIO object at 0x7f...>` and the like: Pillow names the buffer it read, which tells a user nothing.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")

# Pillow modes whose samples are wider than 8 bits; `convert("RGB")` would clip them, so they are rescaled.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class DecodedImage:
    pixels: bytes | None  # imgsz * imgsz * 3 uint8, row-major RGB; None when decoding failed
    width: int | None  # after EXIF orientation, before resizing
    height: int | None
    sha256: str | None  # of the encoded bytes as fetched
    error: str | None


def decode_image(data: bytes | None, imgsz: int, uri: str | None = None, draft: int = 0) -> DecodedImage:
    """uri: where the bytes came from, named in the error (a reason without it cannot be acted on).

    draft > 0: let libjpeg decode JPEGs at a reduced scale (1/2, 1/4 or 1/8, DCT scaling) while both sides stay
    at least `draft * imgsz`, before the exact resize. Faster on large photos, but the pixels differ slightly from
    a full decode; see docs/benchmarks.md (decoding) for what it does to embeddings. 0 (the default): full decode.
    """
    if data is None:
        return DecodedImage(None, None, None, None, "no image bytes")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) == 0:
        return DecodedImage(None, None, None, digest, "empty image file")
    try:
        image = load_rgb(data, draft_size=draft * imgsz)
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return DecodedImage(None, None, None, digest, f"cannot decode image {uri or '(no URI)'}: {error_reason(exc)}")
    width, height = image.size
    resized = resize_image(image, imgsz)
    pixels = np.ascontiguousarray(resized, dtype=np.uint8)
    if pixels.shape != (imgsz, imgsz, 3):
        raise RuntimeError(f"resize_image returned shape {pixels.shape}, expected {(imgsz, imgsz, 3)}")
    return DecodedImage(pixels.tobytes(), width, height, digest, None)


def error_reason(exc: BaseException) -> str:
    """The cause in words, without object addresses."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = _OBJECT_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_rgb(data: bytes, draft_size: int = 0) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        if draft_size and opened.format == "JPEG":
            # a square target: the same request whatever the EXIF orientation
            opened.draft("RGB", (draft_size, draft_size))
        opened.load()  # decode fully here, so truncated files fail now rather than in a later step
        image = ImageOps.exif_transpose(opened)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _WIDE_MODES:
        samples = np.asarray(image, dtype=np.float32)
        if image.mode == "F":
            low, high = float(np.nanmin(samples)), float(np.nanmax(samples))
            scaled = (samples - low) / (high - low) if high > low else np.zeros_like(samples)
        else:
            scaled = samples / (65535.0 if image.mode.startswith("I;16") or samples.max() > 255 else 255.0)
        gray = Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colour; put them on white, as image viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
