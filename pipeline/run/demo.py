"""A small, real sample dataset for `sam3-embed demo`: image files written with Pillow, plus captions.

The images cover what a real bucket holds: JPEG and PNG, RGB, grayscale, palette, RGBA, 16-bit and CMYK modes,
sizes from thumbnails to wide panoramas, and one JPEG whose pixels are stored sideways with an EXIF orientation
tag. Captions are written twice, once in a JSON Lines manifest and once as a `.txt` sidecar beside each image, so
both input formats can read the same set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# EXIF tag 0x0112; value 6 means "rotate 90 degrees clockwise to display".
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_90_CW = 6


@dataclass(frozen=True)
class SampleImage:
    id: str
    path: Path
    caption: str
    split: str
    mode: str
    size: tuple[int, int]  # width, height as stored in the file


@dataclass(frozen=True)
class SampleDataset:
    root: Path
    images_dir: Path
    manifest: Path
    samples: tuple[SampleImage, ...]


def _gradient(width: int, height: int, start: tuple[int, int, int], end: tuple[int, int, int]) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    rows = np.linspace(0.0, 0.3, height, dtype=np.float32)[:, None, None]
    mix = np.clip(ramp + rows, 0.0, 1.0)
    colours = (1.0 - mix) * np.asarray(start, np.float32) + mix * np.asarray(end, np.float32)
    return colours.astype(np.uint8)


def _red_circle_on_blue(size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(_gradient(*size, (20, 40, 120), (90, 160, 230)))
    draw = ImageDraw.Draw(image)
    w, h = size
    r = min(w, h) // 3
    draw.ellipse((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), fill=(220, 30, 30))
    return image


def _green_squares(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (245, 240, 225))
    draw = ImageDraw.Draw(image)
    w, h = size
    step = max(8, min(w, h) // 5)
    for row, y in enumerate(range(step // 2, h - step, step)):
        for col, x in enumerate(range(step // 2, w - step, step)):
            if (row + col) % 2 == 0:
                draw.rectangle((x, y, x + step * 2 // 3, y + step * 2 // 3), fill=(40, 150, 60))
    return image


def _yellow_triangle(size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(_gradient(*size, (10, 10, 10), (70, 70, 90)))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.polygon([(w // 2, h // 8), (w // 8, h * 7 // 8), (w * 7 // 8, h * 7 // 8)], fill=(250, 210, 40))
    return image


def _grayscale_rings(size: tuple[int, int]) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = np.hypot(xx - w / 2, yy - h / 2)
    rings = 127.5 + 127.5 * np.cos(radius / max(w, h) * 12 * math.pi)
    return Image.fromarray(rings.astype(np.uint8), mode="L")


def _palette_stripes(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    colours = [(230, 60, 60), (240, 150, 30), (240, 230, 60), (60, 180, 80), (50, 110, 220), (140, 60, 200)]
    w, h = size
    band = math.ceil(h / len(colours))
    for i, colour in enumerate(colours):
        draw.rectangle((0, i * band, w, (i + 1) * band), fill=colour)
    return image.quantize(colors=len(colours))


def _translucent_star(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = size
    cx, cy, outer, inner = w / 2, h / 2, min(w, h) * 0.45, min(w, h) * 0.18
    points = []
    for i in range(10):
        angle = -math.pi / 2 + i * math.pi / 5
        r = outer if i % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    draw.polygon(points, fill=(255, 140, 0, 200))
    return image


def _deep_gradient(size: tuple[int, int]) -> Image.Image:
    w, h = size
    ramp = np.linspace(0, 65535, w, dtype=np.float64)[None, :].repeat(h, axis=0)
    return Image.fromarray(ramp.astype(np.uint16))


def _cmyk_blocks(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((0, 0, w // 2, h // 2), fill=(0, 200, 220))
    draw.rectangle((w // 2, 0, w, h // 2), fill=(220, 0, 160))
    draw.rectangle((0, h // 2, w // 2, h), fill=(250, 230, 0))
    draw.rectangle((w // 2, h // 2, w, h), fill=(20, 20, 20))
    return image.convert("CMYK")


def _arrow_pointing_up(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (230, 240, 250))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w * 2 // 5, h * 2 // 5, w * 3 // 5, h * 7 // 8), fill=(30, 60, 160))
    draw.polygon([(w // 2, h // 10), (w // 5, h * 2 // 5), (w * 4 // 5, h * 2 // 5)], fill=(30, 60, 160))
    return image


def _horizon(size: tuple[int, int]) -> Image.Image:
    w, h = size
    sky = _gradient(w, h // 2, (120, 180, 250), (250, 200, 150))
    sea = _gradient(w, h - h // 2, (10, 60, 110), (20, 90, 140))
    image = Image.fromarray(np.concatenate([sky, sea], axis=0))
    ImageDraw.Draw(image).ellipse((w * 0.7, h * 0.3, w * 0.7 + h * 0.15, h * 0.45), fill=(255, 240, 200))
    return image


def _noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(1234)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _blue_line_grid(size: tuple[int, int]) -> Image.Image:
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    w, h = size
    for x in range(0, w, 16):
        draw.line((x, 0, x, h), fill=0, width=2)
    for y in range(0, h, 16):
        draw.line((0, y, w, y), fill=0, width=2)
    return image.convert("LA")


def _save_rotated_with_exif(image: Image.Image, path: Path) -> tuple[int, int]:
    """Store the pixels turned 90 degrees counter-clockwise and tag them so viewers turn them back."""
    stored = image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_90_CW
    stored.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return stored.size


# (name, painter, size as displayed, file extension, caption, split); extension decides the codec.
_RECIPES = (
    ("red_circle", _red_circle_on_blue, (640, 480), "jpg", "a red circle on a blue gradient", "train"),
    ("green_squares", _green_squares, (320, 320), "png", "a checkerboard of green squares", "train"),
    ("yellow_triangle", _yellow_triangle, (300, 500), "jpg", "a yellow triangle on a dark background", "train"),
    ("gray_rings", _grayscale_rings, (256, 256), "png", "concentric grey rings", "train"),
    ("rainbow_stripes", _palette_stripes, (400, 240), "png", "horizontal rainbow stripes", "train"),
    ("orange_star", _translucent_star, (360, 360), "png", "an orange star on a transparent background", "train"),
    ("deep_gradient", _deep_gradient, (512, 128), "png", "a smooth grey gradient from black to white", "val"),
    ("cmyk_blocks", _cmyk_blocks, (300, 300), "jpg", "four blocks of cyan, magenta, yellow and black", "val"),
    ("arrow_up", _arrow_pointing_up, (240, 360), "jpg", "a blue arrow pointing up", "val"),
    ("horizon", _horizon, (1200, 300), "jpg", "a sunset over the sea", "val"),
    ("noise", _noise, (96, 64), "png", "random coloured noise", "val"),
    ("line_grid", _blue_line_grid, (200, 150), "png", "a grid of thin black lines", "val"),
)
# The arrow is the sideways one: after EXIF transposition it must point up again.
_EXIF_ROTATED = "arrow_up"


def write_sample_dataset(root: str | Path) -> SampleDataset:
    """Write 12 images, their `.txt` caption sidecars and `manifest.jsonl` under `root`; return what was written.

    The manifest has the columns `id`, `image` (absolute path), `caption` and `split`. Existing files with the
    same names are overwritten; nothing else in `root` is touched.
    """
    root = Path(root).resolve()
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for name, paint, size, extension, caption, split in _RECIPES:
        path = images_dir / f"{name}.{extension}"
        image = paint(size)
        if name == _EXIF_ROTATED:
            stored_size = _save_rotated_with_exif(image, path)
        elif extension == "jpg":
            image.save(path, format="JPEG", quality=90)
            stored_size = image.size
        else:
            image.save(path, format="PNG")
            stored_size = image.size
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        samples.append(SampleImage(name, path, caption, split, image.mode, stored_size))
    manifest = root / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for sample in samples:
            row = {"id": sample.id, "image": str(sample.path), "caption": sample.caption, "split": sample.split}
            f.write(json.dumps(row) + "\n")
    return SampleDataset(root=root, images_dir=images_dir, manifest=manifest, samples=tuple(samples))
