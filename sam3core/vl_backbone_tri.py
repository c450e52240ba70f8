"""SAM 3.1's vision-language backbone: SAM 3's trunk and text encoder with the three-headed neck.

`forward_image` returns what Meta's `SAM3VLBackboneTri` returns, with plain tensors where Meta wraps the maps in
`NestedTensor` (their mask is None for this trunk):
- the detector head (`convs`): `vision_features` (the last level), `vision_mask` (None), `vision_pos_enc`,
  `backbone_fpn` (3 levels: 4x, 2x and 1x the ViT grid; 288, 144, 72 at 1008 px);
- `interactive`: the same four keys from `interactive_convs` (point and box prompts);
- `sam2_backbone_out`: the same four keys from `propagation_convs` (the video tracker reads it under SAM 2's name).
The `need_*` switches leave a head out of both the computation and the dictionary, as Meta's do.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .tri_neck import Sam3TriViTDetNeck
from .vl_backbone import SAM3VLBackbone


class SAM3VLBackboneTri(SAM3VLBackbone):
    """`SAM3VLBackbone` over a `Sam3TriViTDetNeck`; `forward_text` and `forward_trunk` are SAM 3's unchanged."""

    vision_backbone: Sam3TriViTDetNeck

    def forward_image_from_trunk(
        self,
        trunk_map: Tensor,
        *,
        need_sam3_out: bool = True,
        need_interactive_out: bool = True,
        need_propagation_out: bool = True,
    ) -> dict[str, Any]:
        """The neck half of `forward_image`: a trunk map [B, width, g, g] -> the same dictionary (cast to the
        neck's device and dtype first)."""
        x = self._trunk_input(trunk_map)
        neck = self.vision_backbone
        wanted = {
            "need_sam3_out": need_sam3_out,
            "need_interactive_out": need_interactive_out,
            "need_propagation_out": need_propagation_out,
        }
        if self.act_ckpt_whole_vision_backbone and self.training:
            levels = checkpoint(neck.forward_from_trunk, x, use_reentrant=False, **wanted)
        else:
            levels = neck.forward_from_trunk(x, **wanted)
        sam3, interactive, propagation = (self._head(levels[i], levels[i + 1]) for i in (0, 2, 4))
        output: dict[str, Any] = {}
        if need_sam3_out:
            output.update(sam3)
        if need_interactive_out:
            output["interactive"] = interactive
        if need_propagation_out:
            output["sam2_backbone_out"] = propagation
        return output

    def _head(self, features: list[Tensor], positions: list[Tensor]) -> dict[str, Any]:
        features, positions = self._scalped(features), self._scalped(positions)
        return {
            "vision_features": features[-1] if features else None,
            "vision_mask": None,  # Meta's NestedTensor mask: None for a plain ViT trunk
            "vision_pos_enc": positions,
            "backbone_fpn": features,
        }

    def forward_image(
        self,
        samples: Tensor,
        *,
        need_sam3_out: bool = True,
        need_interactive_out: bool = True,
        need_propagation_out: bool = True,
    ) -> dict[str, Any]:
        """samples [B, 3, S, S] -> the heads asked for; trunk then neck, through the two public halves."""
        return self.forward_image_from_trunk(
            self.forward_trunk(samples),
            need_sam3_out=need_sam3_out,
            need_interactive_out=need_interactive_out,
            need_propagation_out=need_propagation_out,
        )

    def forward_image_sam2(self, samples: Tensor) -> dict[str, Any]:
        """Only what SAM 3.1 passes as `sam2_backbone_out`: the propagation head."""
        return self.forward_image(samples, need_sam3_out=False, need_interactive_out=False)["sam2_backbone_out"]
