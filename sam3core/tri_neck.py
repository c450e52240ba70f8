"""SAM 3.1's neck: the ViTDet simple-FPN of SAM 3, three times over the same trunk map, each with its own weights.

Meta's `Sam3TriViTDetNeck` (released with SAM 3.1, `sam3/model/necks.py`): three levels (scale factors 4, 2, 1) and
three heads with the per-level modules of SAM 3's neck (`dconv_2x2_0`, `gelu`, `dconv_2x2_1` at 4x; `dconv_2x2` at
2x; then `conv_1x1`, `conv_3x3`): `convs` feeds the detector, `interactive_convs` the point and box prompts (the
role SAM 3's `sam2_convs` had), `propagation_convs` the video tracker's memory. Each head is paid for only when
asked for, so a caller that reads the detector's levels alone runs one head, not three.
"""

from __future__ import annotations

from torch import Tensor, nn

from .neck import fpn_level, pyramid_levels

HEADS = ("convs", "interactive_convs", "propagation_convs")

# Per head: features and position encodings per level; empty lists for a head that was not asked for, as Meta's.
TriNeckOutput = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


class Sam3TriViTDetNeck(nn.Module):
    """Runs the trunk, then up to three simple-FPN pyramids over its last map, with a position encoding per level."""

    def __init__(
        self,
        trunk: nn.Module,
        position_encoding: nn.Module,
        d_model: int,
        scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0),
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.position_encoding = position_encoding
        self.scale_factors = tuple(scale_factors)
        dim = trunk.channel_list[-1]
        for head in HEADS:  # three independent copies: the checkpoint holds different weights for each
            self.add_module(head, nn.ModuleList(fpn_level(dim, d_model, scale) for scale in self.scale_factors))

    def forward(
        self,
        tensor_list: Tensor,
        *,
        need_sam3_out: bool = True,
        need_interactive_out: bool = True,
        need_propagation_out: bool = True,
    ) -> TriNeckOutput:
        return self.forward_from_trunk(
            self.trunk(tensor_list)[-1],
            need_sam3_out=need_sam3_out,
            need_interactive_out=need_interactive_out,
            need_propagation_out=need_propagation_out,
        )

    def forward_from_trunk(
        self,
        x: Tensor,
        *,
        need_sam3_out: bool = True,
        need_interactive_out: bool = True,
        need_propagation_out: bool = True,
    ) -> TriNeckOutput:
        """The neck half: the trunk's last map [B, width, g, g] -> (features, positions) of each head asked for."""
        wanted = (need_sam3_out, need_interactive_out, need_propagation_out)
        out: list[list[Tensor]] = []
        for head, need in zip(HEADS, wanted, strict=True):
            features, positions = self.head_levels(x, head) if need else ([], [])
            out += [features, positions]
        return tuple(out)  # type: ignore[return-value]

    def head_levels(self, x: Tensor, head: str) -> tuple[list[Tensor], list[Tensor]]:
        """One head's levels [B, d_model, g * s, g * s] for each scale s, and their sine position encodings."""
        return pyramid_levels(x, getattr(self, head), self.position_encoding)

    def set_imgsz(self, imgsz: list[int] | tuple[int, int] = (1008, 1008)) -> None:
        self.trunk.set_imgsz(imgsz)
