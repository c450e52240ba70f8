"""Configurations of the SAM 3 and SAM 3.1 vision-language backbones.

`sam3` is the official configuration (the one `sam3.pt` was trained with); `tiny` keeps every structural choice
(patch 14, windowed and global RoPE blocks, tiled absolute positions, four FPN levels, causal text tower) at a size
that runs in milliseconds on a CPU, for tests and demos.

`sam3.1` (`sam3.1_multiplex.pt`) keeps SAM 3's trunk and text encoder and changes the neck: three levels (4x, 2x,
1x; no 0.5x level, so nothing to scalp) and three heads with their own weights (`convs` for the detector,
`interactive_convs`, `propagation_convs`). `tiny-sam3.1` is `tiny` with that neck.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


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


GENERATIONS = ("sam3", "sam3.1")


@dataclass(frozen=True)
class Sam3Config:
    name: str = "sam3"
    generation: str = "sam3"  # "sam3": dual neck (`convs`, optional `sam2_convs`); "sam3.1": three-headed neck
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
_SAM31 = {"generation": "sam3.1", "scale_factors": (4.0, 2.0, 1.0), "scalp": 0}
CONFIGS["sam3.1"] = replace(CONFIGS["sam3"], name="sam3.1", **_SAM31)
CONFIGS["tiny-sam3.1"] = replace(CONFIGS["tiny"], name="tiny-sam3.1", **_SAM31)
AUTO = "auto"  # build_sam3_vl_backbone: the configuration of the checkpoint's generation (sam3 or sam3.1)


def get_config(config: str | Sam3Config) -> Sam3Config:
    if isinstance(config, Sam3Config):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        choices = sorted([*CONFIGS, AUTO])
        raise ValueError(f"unknown model config {config!r}; choose one of {choices}") from None
