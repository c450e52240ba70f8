"""2D axial rotary position embedding in real arithmetic.

The official code keeps the rotation as complex `freqs_cis` buffers. Complex buffers are lost when a module is cast
to a real dtype and they break `torch.compile`, so here a rotation is a pair of float32 (cos, sin) tables and the
rotation of each (even, odd) channel pair is written out: (a, b) -> (a cos - b sin, a sin + b cos).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def axial_rope_angles(
    head_dim: int, grid: int, theta: float, position_scale: float, device: torch.device | None = None
) -> Tensor:
    """Rotation angles for a `grid` x `grid` token map, row-major: [grid * grid, head_dim // 2].

    The first half of the channel pairs rotates with the x (column) position, the second half with y (row).
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs a head dimension divisible by 4, got {head_dim}")
    freqs = 1.0 / (
        theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[: head_dim // 4] / head_dim)
    )
    index = torch.arange(grid * grid, dtype=torch.float32, device=device)
    x = (index % grid) * position_scale
    y = torch.div(index, grid, rounding_mode="floor") * position_scale
    return torch.cat([torch.outer(x, freqs), torch.outer(y, freqs)], dim=-1)


def rotate_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., L, head_dim] rotated pairwise in float32, written out: what a compiled graph runs (inductor fuses
    these elementwise ops into one kernel, and compiles no complex arithmetic). Eagerly it is about eight passes
    over x (cast, four products, two sums, stack)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., L, head_dim / 2, 2]
    a, b = pairs.unbind(-1)
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def rotate_complex(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The same rotation as one complex multiplication (a cast, one product, a cast back): what eager code runs.
    Bit-identical to `rotate_real` on a CPU and 1.9x to 35x faster there in two runs on a shared machine
    (bench/rope.py, docs/benchmarks.md); the complex table is made per call from the float32 (cos, sin) pair, so
    no complex buffer is ever stored."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


class AxialRoPE(nn.Module):
    """Holds the (cos, sin) tables of one attention layout and rotates queries and keys with them.

    The tables are recomputed (in float32) whenever the module moves, so casting the model to bfloat16 or float16
    never degrades them, and they are never stored in checkpoints.
    """

    def __init__(self, head_dim: int, grid: int, theta: float, position_scale: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.grid = grid
        self.position_scale = position_scale
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(torch.device("cpu"))

    def _build(self, device: torch.device) -> None:
        # explicit device: the tables are real even when the model is assembled on the meta device
        angles = axial_rope_angles(self.head_dim, self.grid, self.theta, self.position_scale, device)
        self.cos = angles.cos()
        self.sin = angles.sin()

    def reset(self, grid: int, position_scale: float) -> None:
        self.grid = grid
        self.position_scale = position_scale
        self._build(self.cos.device)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self._build(self.cos.device)
        return self

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q, k: [B, heads, L, head_dim] with L == grid * grid."""
        return self._rotate(q), self._rotate(k)

    def _rotate(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return rotate_real(x, self.cos, self.sin)
        return rotate_complex(x, self.cos, self.sin)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, position_scale={self.position_scale:.4g}, theta={self.theta:g}"
