"""The ViT image trunk of SAM 3 (ViTDet style: windowed attention with a few global blocks, 2D RoPE).

Tokens stay in a [B, H, W, C] map throughout; window blocks cut it into non-overlapping windows
(zero-padding the map to a multiple of the window), global blocks attend over the whole map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .config import VisionConfig
from .rope import AxialRoPE


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over a square token map, with axial RoPE on queries and keys."""

    def __init__(self, dim: int, heads: int, rope: AxialRoPE) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        q, k = self.rope(q, k)
        x = attention(q, k, v)
        x = x.transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj(x)


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * windows, window, window, C], zero-padding H and W up to a multiple of `window`."""
    batch, height, width, channels = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: [B * windows, window, window, C] -> [B, H, W, C]."""
    padded_h, padded_w = padded
    height, width = size
    batch = windows.shape[0] // ((padded_h // window) * (padded_w // window))
    x = windows.reshape(batch, padded_h // window, padded_w // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    return x[:, :height, :width, :]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, window: int, rope: AxialRoPE, eps: float) -> None:
        super().__init__()
        self.window = window  # 0 for a global block
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window:
            height, width = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window)
            x = window_unpartition(self.attn(x), self.window, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, 3, S, S] -> [B, S/p, S/p, C]


class ViT(nn.Module):
    """Image trunk: [B, 3, S, S] -> [[B, width, S/patch, S/patch]] (a one-element list, as necks expect)."""

    def __init__(self, config: VisionConfig, imgsz: int) -> None:
        super().__init__()
        self.config = config
        self.channel_list = [config.width]
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        pretrain_grid = config.pretrain_img_size // config.patch_size
        # The table learned at pretrain size, with its (unused) class-token slot first.
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid * pretrain_grid + 1, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        head_dim = config.width // config.heads
        # Every window block shares one table: windows never change size. Each global block gets its own module
        # (same values), so that a checkpoint's per-block RoPE buffers map one to one.
        window_rope = AxialRoPE(head_dim, config.window_size, config.rope_theta, position_scale=1.0)
        self.blocks = nn.ModuleList()
        for index in range(config.depth):
            is_global = index in config.global_blocks
            rope = AxialRoPE(head_dim, 1, config.rope_theta, 1.0) if is_global else window_rope
            self.blocks.append(
                Block(
                    config.width,
                    config.heads,
                    config.mlp_ratio,
                    window=0 if is_global else config.window_size,
                    rope=rope,
                    eps=config.layer_norm_eps,
                )
            )
        self.last_block = max(config.global_blocks)
        self.imgsz = 0
        self.set_imgsz([imgsz, imgsz])

    def set_imgsz(self, imgsz: list[int] | tuple[int, int] = (1008, 1008)) -> None:
        height, width = imgsz
        patch = self.config.patch_size
        if height != width:
            raise ValueError(f"only square inputs are supported, got {height}x{width}")
        if height <= 0 or height % patch:
            raise ValueError(f"image size must be a positive multiple of the patch size {patch}, got {height}")
        grid = height // patch
        # Global blocks see the whole grid; their positions are rescaled to the window's range, as in training.
        scale = self.config.window_size / grid
        for block in self.blocks:
            if not block.window:
                block.attn.rope.reset(grid, scale)
        self.imgsz = height

    def tiled_pos_embed(self, height: int, width: int) -> Tensor:
        """The pretrain-size table without its class slot, tiled over the token grid and cropped: [1, H, W, C]."""
        table = self.pos_embed[:, 1:]
        size = int(table.shape[1] ** 0.5)
        table = table.reshape(1, size, size, -1)
        if size == height and size == width:
            return table
        reps_h, reps_w = height // size + 1, width // size + 1
        return table.tile(1, reps_h, reps_w, 1)[:, :height, :width, :]

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.imgsz or x.shape[3] != self.imgsz:
            raise ValueError(
                f"expected images of shape [B, 3, {self.imgsz}, {self.imgsz}], got {list(x.shape)}; "
                f"resize them with sam3core.preprocess_images or call set_imgsz([{x.shape[-1]}, {x.shape[-1]}])"
            )
        x = self.patch_embed(x)  # [B, H, W, C]
        x = x + self.tiled_pos_embed(x.shape[1], x.shape[2])
        x = self.ln_pre(x)
        for block in self.blocks[: self.last_block + 1]:
            x = block(x)
        return [x.permute(0, 3, 1, 2)]  # [B, C, H, W]
