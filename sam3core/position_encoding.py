"""Sine position encoding of a 2D feature map (DETR style, normalized, 2*pi scale)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.half_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def encode_grid(self, height: int, width: int, device: torch.device) -> Tensor:
        """[num_pos_feats, height, width] in float32: y features first, then x."""
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            y = y / (y[-1:] + eps) * self.scale
            x = x / (x[-1:] + eps) * self.scale
        dim_t = torch.arange(self.half_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.half_feats)
        pos_y = self._interleave(y[:, None] / dim_t)  # [H, half]
        pos_x = self._interleave(x[:, None] / dim_t)  # [W, half]
        pos_y = pos_y[:, None, :].expand(height, width, -1)
        pos_x = pos_x[None, :, :].expand(height, width, -1)
        return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)

    @staticmethod
    def _interleave(angles: Tensor) -> Tensor:
        # sin on even channels, cos on odd ones, interleaved as the original does
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, num_pos_feats, H, W] float32."""
        height, width = x.shape[-2], x.shape[-1]
        if torch.compiler.is_compiling():
            pos = self.encode_grid(height, width, x.device)
        else:
            key = (height, width, x.device)
            pos = self._cache.get(key)
            if pos is None:
                pos = self._cache[key] = self.encode_grid(height, width, x.device)
        return pos[None].expand(x.shape[0], -1, -1, -1)
