"""ViTDet simple-FPN neck, optionally doubled for SAM 2 style heads (same layout, separate weights)."""

from __future__ import annotations

from copy import deepcopy

from torch import Tensor, nn


class FpnLevel(nn.Sequential):
    """An `nn.Sequential` whose forward is defined here, not in torch: Dynamo does not trace a frame of torch's
    own `Sequential.forward` when the module is compiled on its own (it reports no graph and runs it eagerly),
    so the level would be "compiled" in name only. Same children, same parameter names."""

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = layer(x)
        return x


def pyramid_levels(x: Tensor, levels: nn.ModuleList, position_encoding: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Each level's map [B, d_model, g * s, g * s] from the trunk's [B, dim, g, g], and its sine position encoding
    in the map's dtype."""
    features, positions = [], []
    for level in levels:
        feature = level(x)
        features.append(feature)
        positions.append(position_encoding(feature).to(feature.dtype))
    return features, positions


def fpn_level(dim: int, d_model: int, scale: float) -> FpnLevel:
    """One pyramid level from the trunk's [B, dim, g, g] map to [B, d_model, g * scale, g * scale]."""
    level = FpnLevel()
    if scale == 4.0:
        level.add_module("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        level.add_module("gelu", nn.GELU())
        level.add_module("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2))
        out_dim = dim // 4
    elif scale == 2.0:
        level.add_module("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        out_dim = dim // 2
    elif scale == 1.0:
        out_dim = dim
    elif scale == 0.5:
        level.add_module("maxpool_2x2", nn.MaxPool2d(kernel_size=2, stride=2))
        out_dim = dim
    else:
        raise ValueError(f"unsupported FPN scale factor {scale}; use 4.0, 2.0, 1.0 or 0.5")
    level.add_module("conv_1x1", nn.Conv2d(out_dim, d_model, kernel_size=1))
    level.add_module("conv_3x3", nn.Conv2d(d_model, d_model, kernel_size=3, padding=1))
    return level


class Sam3DualViTDetNeck(nn.Module):
    """Runs the trunk, then one (or two) simple-FPN pyramids over its last map, with a position encoding per level."""

    def __init__(
        self,
        trunk: nn.Module,
        position_encoding: nn.Module,
        d_model: int,
        scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
        add_sam2_neck: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.position_encoding = position_encoding
        self.scale_factors = tuple(scale_factors)
        dim = trunk.channel_list[-1]
        self.convs = nn.ModuleList(fpn_level(dim, d_model, scale) for scale in self.scale_factors)
        self.sam2_convs = deepcopy(self.convs) if add_sam2_neck else None

    def forward(
        self, tensor_list: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        return self.forward_from_trunk(self.trunk(tensor_list)[-1])

    def forward_from_trunk(
        self, x: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """The neck half: the trunk's last map [B, width, g, g] -> every level and its position encoding."""
        sam3_out, sam3_pos = self.sam_forward_feature_levels(x, self.convs)
        if self.sam2_convs is None:
            return sam3_out, sam3_pos, None, None
        sam2_out, sam2_pos = self.sam_forward_feature_levels(x, self.sam2_convs)
        return sam3_out, sam3_pos, sam2_out, sam2_pos

    def sam_forward_feature_levels(self, x: Tensor, convs: nn.ModuleList) -> tuple[list[Tensor], list[Tensor]]:
        return pyramid_levels(x, convs, self.position_encoding)

    def set_imgsz(self, imgsz: list[int] | tuple[int, int] = (1008, 1008)) -> None:
        self.trunk.set_imgsz(imgsz)
