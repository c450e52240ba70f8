"""The compact record of one backbone run that the parity tests compare against.

A record names every output tensor by its path in the backbone's output dictionary (`backbone_fpn.0`,
`sam2_backbone_out.vision_pos_enc.1`, `language_mask`, ...) and keeps, per tensor: shape, dtype, the sum and
the sum of absolute values (float64 accumulation), and the values at a fixed set of flat indices. The
indices come from `sample_indices`, a function of the element count only, so the generator and the tests
pick the same elements without storing them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

SAMPLES_PER_TENSOR = 64
_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def sample_indices(numel: int, count: int = SAMPLES_PER_TENSOR) -> list[int]:
    """Sorted flat indices spread over a tensor: first, last, and a golden-ratio sequence in between.

    The low-discrepancy sequence avoids the aliasing of an even stride, which in a [B, C, H, W] tensor
    would keep landing on the same channel or column.
    """
    if numel <= count:
        return list(range(numel))
    picked = {0, numel - 1}
    step = 1
    while len(picked) < count:
        picked.add(math.floor(((step * _GOLDEN_FRACTION) % 1.0) * numel))
        step += 1
    return sorted(picked)


def flatten_outputs(outputs: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """`{dotted path: tensor}` for every tensor in a nested output dictionary (lists become `.0`, `.1`)."""
    flat: dict[str, torch.Tensor] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[path] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{path}.{index}")
        elif value is not None:
            raise TypeError(f"{path}: unexpected output of type {type(value).__name__}")

    visit(outputs, prefix)
    return flat


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _python_number(value: torch.Tensor) -> float | int | bool:
    return value.item()


def summarize_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, sums and sampled values of one output tensor."""
    detached = tensor.detach().cpu()
    as_float64 = detached.to(torch.float64)
    flat = detached.reshape(-1)
    indices = sample_indices(flat.numel())
    return {
        "shape": list(detached.shape),
        "dtype": dtype_name(detached.dtype),
        "sum": as_float64.sum().item(),
        "abs_sum": as_float64.abs().sum().item(),
        "samples": [_python_number(flat[i]) for i in indices],
    }


def summarize_outputs(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {path: summarize_tensor(tensor) for path, tensor in flatten_outputs(outputs).items()}
