"""MaskFormer's plain FPN pixel decoder (``BasePixelDecoder``): the cheap option.

No attention at all, so it is the fastest pixel decoder on a CPU; Mask2Former reports it a
few PQ points below the deformable one. Select it with
``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME: BasePixelDecoder``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

__all__ = ["BasePixelDecoder", "lateral_and_output_convs"]


def lateral_and_output_convs(in_channels: int, conv_dim: int, norm: str):
    """One FPN level: a 1x1 lateral conv and a 3x3 output conv, Xavier-initialised (Mask2Former's
    FPN step, shared by both pixel decoders)."""
    use_bias = norm == ""
    lateral = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias,
                     norm=get_norm(norm, conv_dim))
    output = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1,
                    bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu)
    weight_init.c2_xavier_fill(lateral)
    weight_init.c2_xavier_fill(output)
    return lateral, output


@SEM_SEG_HEADS_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """Top-down FPN over all input features (res5 -> res2), nearest upsampling, 3x3 output
    convs; the first three outputs (res5, res4, res3) feed the transformer decoder."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int,
                 norm: Optional[str] = None):
        super().__init__()
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]  # res2 .. res5
        channels = [v.channels for _, v in by_stride]
        use_bias = norm == ""
        lateral_convs: List[Optional[nn.Module]] = []
        output_convs: List[nn.Module] = []
        for idx, in_channels in enumerate(channels):
            if idx == len(channels) - 1:  # the coarsest level has no lateral connection
                output = Conv2d(in_channels, conv_dim, kernel_size=3, stride=1, padding=1,
                                bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu)
                weight_init.c2_xavier_fill(output)
                self.add_module(f"layer_{idx + 1}", output)
                lateral_convs.append(None)
                output_convs.append(output)
            else:
                lateral, output = lateral_and_output_convs(in_channels, conv_dim, norm)
                self.add_module(f"adapter_{idx + 1}", lateral)
                self.add_module(f"layer_{idx + 1}", output)
                lateral_convs.append(lateral)
                output_convs.append(output)
        # top-down order (low to high resolution)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self.maskformer_num_feature_levels = 3

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def forward_features(self, features: Dict[str, Tensor]
                         ) -> Tuple[Tensor, None, List[Tensor]]:
        """Returns (mask_features at the finest level, None, 3 features lowest resolution first)."""
        multi_scale_features: List[Tensor] = []
        y: Optional[Tensor] = None
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            lateral, output = self.lateral_convs[idx], self.output_convs[idx]
            if lateral is None:
                y = output(x)
            else:
                cur = lateral(x)
                y = output(cur + F.interpolate(y, size=cur.shape[-2:], mode="nearest"))
            if len(multi_scale_features) < self.maskformer_num_feature_levels:
                multi_scale_features.append(y)
        return self.mask_features(y), None, multi_scale_features
