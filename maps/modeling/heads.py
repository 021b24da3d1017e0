"""Mask2Former's segmentation head: pixel decoder, then the masked-attention decoder.

The head is where MAPS's retrieved memory enters the model: it is passed through untouched
to the transformer decoder (``memory``), whose layers fuse it into the queries (Eq. 1).
"""
from __future__ import annotations

from typing import Dict, Optional

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.pixel_decoder import build_pixel_decoder

__all__ = ["MaskFormerHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: backbone features the pixel decoder reads.
            num_classes: number of categories, without the "no object" class.
            pixel_decoder: module with ``forward_features``.
            transformer_predictor: the masked-attention transformer decoder.
            transformer_in_feature: which pixel decoder output feeds the predictor; Mask2Former
                uses "multi_scale_pixel_decoder" (3 levels, lowest resolution first).
        """
        super().__init__()
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        from maps.modeling.transformer_decoder import build_transformer_decoder

        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in head.IN_FEATURES if f not in input_shape]
        if missing:
            raise ConfigError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not produced by the backbone "
                f"(it has {sorted(input_shape)}; see MODEL.RESNETS.OUT_FEATURES)")
        feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if feature != "multi_scale_pixel_decoder":
            raise ConfigError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE {feature!r}: the masked-attention "
                "decoder reads 'multi_scale_pixel_decoder' (3 levels of CONVS_DIM channels)")
        in_channels = head.CONVS_DIM
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "ignore_value": head.IGNORE_VALUE,
            "num_classes": head.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": head.LOSS_WEIGHT,
            "transformer_in_feature": feature,
            "transformer_predictor": build_transformer_decoder(
                cfg, in_channels, mask_classification=True),
        }

    def forward(self, features: Dict[str, Tensor], mask: Optional[Tensor] = None,
                memory: Optional[MemoryTokens] = None) -> dict:
        """Returns the decoder's {"pred_logits", "pred_masks", "aux_outputs"}."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        if memory is None:
            # keep the plain Mask2Former call so any Mask2Former-style decoder works
            return self.predictor(multi_scale_features, mask_features, mask)
        return self.predictor(multi_scale_features, mask_features, mask, memory=memory)
