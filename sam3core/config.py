"""Configurations of the SAM 3 vision-language backbone.

`sam3` is the official configuration (the one `sam3.pt` was trained with); `tiny` keeps every structural choice
(patch 14, windowed and global RoPE blocks, tiled absolute positions, four FPN levels, causal text tower) at a size
that runs in milliseconds on a CPU, for tests and demos.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 14
    width: int = 1024
    depth: int = 32
    heads: int = 16
    mlp_ratio: float = 4.625
    window_size: int = 24
    global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    pretrain_img_size: int = 336  # the absolute position table was learned at this size
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 32
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    projection_dim: int = 512  # `text_projection` in the checkpoint; stored but unused by the backbone


@dataclass(frozen=True)
class Sam3Config:
    name: str = "sam3"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    d_model: int = 256
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    scalp: int = 1
    default_imgsz: int = 1008

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, Sam3Config] = {
    "sam3": Sam3Config(),
    "tiny": Sam3Config(
        name="tiny",
        vision=VisionConfig(
            width=64,
            depth=4,
            heads=4,
            window_size=8,
            global_blocks=(1, 3),
            pretrain_img_size=112,
        ),
        text=TextConfig(width=64, layers=2, heads=4, projection_dim=32),
        d_model=32,
        default_imgsz=224,
    ),
}


def get_config(config: str | Sam3Config) -> Sam3Config:
    if isinstance(config, Sam3Config):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown model config {config!r}; choose one of {sorted(CONFIGS)}") from None
