"""Deterministic weights and inputs for the parity tests against the official SAM 3 backbone.

Both sides of a parity check must see the same checkpoint without shipping it: the reference generator
(`tools/make_parity_reference.py`, run once against Meta's package) and the tests (run in CI without it)
rebuild every tensor from its checkpoint key and shape alone. Values depend on nothing else: no global
seed, no parameter order, no version-specific sampler.

Scale. Matrices and convolution kernels get a spread of 1/sqrt(fan_in), so every projection keeps
unit-size activations. Attention logits are then O(1): a wrong rotary table, window split or causal mask
moves the outputs far past float32 noise instead of hiding behind near-uniform attention (a 0.02 spread
would leave the tiny model almost blind to them). Pre-norm blocks keep 32 vision and 24 text layers tame at
that scale (the residual stream grows to single digits). LayerNorm weights sit near 1, biases are small,
position and token tables have a spread of 0.5 so that tiling and cropping mistakes survive `ln_pre`.

Values come from a uniform draw (`torch.rand`): its integer-to-float conversion is bit-exact on every CPU,
unlike the vectorised Box-Muller path of `torch.randn`. A uniform on [-sqrt(3), sqrt(3)] has unit variance.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

ROPE_TABLE_SUFFIX = "freqs_cis"
TABLE_SPREAD = 0.5
NORM_WEIGHT_SPREAD = 0.1
BIAS_SPREAD = 0.02

# An ordinary caption, one that overflows the 32-token context (the tokenizer must truncate and still end
# with the end token), and an empty one (start and end token only).
PARITY_CAPTIONS: tuple[str, ...] = (
    "a red bicycle leaning against a brick wall",
    "an extremely long and detailed caption describing a crowded city street at dusk, with neon signs, "
    "wet asphalt reflecting the lights, dozens of pedestrians holding umbrellas, taxis, buses "
    "and a street vendor",
    "",
)
ADDITIONAL_TEXT: tuple[str, ...] = ("dog", "the person on the left wearing a hat")

_UNIFORM_HALF_WIDTH = math.sqrt(3.0)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _seed(name: str, shape: Sequence[int]) -> int:
    return zlib.crc32(f"{name}|{','.join(str(int(d)) for d in shape)}".encode())


def _unit_uniform(name: str, shape: Sequence[int]) -> torch.Tensor:
    """Zero-mean, unit-variance values that depend only on `name` and `shape`."""
    generator = torch.Generator(device="cpu").manual_seed(_seed(name, shape))
    draw = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    # In place: the same operations in the same order (so the same bits) without a temporary per step, which
    # cost the 800M-value "sam3" checkpoint most of its generation time.
    return draw.mul_(2.0).sub_(1.0).mul_(_UNIFORM_HALF_WIDTH)


def _is_norm_module(module_name: str) -> bool:
    leaf = module_name.rpartition(".")[2]
    return "norm" in leaf or leaf.startswith("ln_")


def _is_position_or_token_table(name: str) -> bool:
    return name.rpartition(".")[2] in {"pos_embed", "positional_embedding"} or ".token_embedding." in name


def _centre_and_spread(name: str, shape: Sequence[int]) -> tuple[float, float]:
    module_name, _, attribute = name.rpartition(".")
    if _is_position_or_token_table(name):
        return 0.0, TABLE_SPREAD
    if len(shape) == 1:
        if _is_norm_module(module_name) and attribute == "weight":
            return 1.0, NORM_WEIGHT_SPREAD
        return 0.0, BIAS_SPREAD
    fan_in = math.prod(int(d) for d in shape[1:])
    return 0.0, 1.0 / math.sqrt(fan_in)


def deterministic_tensor(name: str, shape: Sequence[int], dtype: torch.dtype | str = torch.float32) -> torch.Tensor:
    """The test checkpoint's value for key `name`: a function of the key and the shape only.

    `*freqs_cis` entries (the official complex RoPE tables) are zeros: loaders must recompute them for the
    input size, and one that used the stored table would visibly break (a zero table cancels queries and
    keys).
    """
    resolved = _as_dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if name.endswith(ROPE_TABLE_SUFFIX):
        return torch.zeros(shape, dtype=resolved)
    if not resolved.is_floating_point:
        raise ValueError(f"{name}: no deterministic rule for dtype {resolved}")
    centre, spread = _centre_and_spread(name, shape)
    return _unit_uniform(name, shape).mul_(spread).add_(centre).to(resolved)  # centre + spread * u, exactly


def deterministic_state_dict(
    spec: Mapping[str, tuple[Sequence[int], torch.dtype | str]],
) -> dict[str, torch.Tensor]:
    """A whole checkpoint from `{key: (shape, dtype)}`, in the order of `spec`."""
    return {name: deterministic_tensor(name, shape, dtype) for name, (shape, dtype) in spec.items()}


def _patch_size(config: Any) -> int:
    if isinstance(config, str):
        from sam3core.config import get_config

        config = get_config(config)
    return int(config.vision.patch_size)


def parity_images(config: Any, imgsz: int) -> torch.Tensor:
    """A fixed batch of two normalized images [2, 3, imgsz, imgsz] with values in [-1, 1].

    Smooth gradients plus a fine pattern, different per image and channel, so every patch and window sees
    distinct content; closed-form, hence identical on every machine. `config` is a configuration name or any
    object with `.vision.patch_size` (the reference generator passes sam3core's dataclass loaded straight
    from its file, so that it never imports the implementation under test).
    """
    patch_size = _patch_size(config)
    if imgsz <= 0 or imgsz % patch_size:
        raise ValueError(f"imgsz must be a positive multiple of {patch_size}, got {imgsz}")
    coords = torch.linspace(0.0, 1.0, imgsz, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(2, 3, imgsz, imgsz, dtype=torch.float64)
    for image in range(2):
        for channel in range(3):
            phase = 1.7 * image + 0.9 * channel
            smooth = torch.sin(2.0 * math.pi * (1.3 + image) * x + phase) * torch.cos(
                2.0 * math.pi * (0.7 + channel) * y - phase
            )
            fine = torch.sin(97.0 * x * (1 + channel) + 61.0 * y * (2 - image) + phase)
            images[image, channel] = 0.75 * smooth + 0.25 * fine
    return images.clamp(-1.0, 1.0).to(torch.float32)
