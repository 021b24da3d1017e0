"""Mask2Former's pixel decoder: a deformable-attention encoder over res3-res5 plus an FPN
step to res2 (Cheng et al. 2022, section 3.2 and appendix).

The encoder mixes the three coarse levels with multi-scale deformable attention; the output
at stride 4 (``mask_features``) is what every query's mask is a dot product with, and the
three encoder outputs (lowest resolution first) are what the masked-attention decoder's
layers attend to in round robin. Parameter names follow the original implementation.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from maps.modeling.pixel_decoder.fpn import lateral_and_output_convs
from maps.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn
from maps.modeling.position_encoding import PositionEmbeddingSine

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoderLayer",
]

# Mask2Former hard-codes the deformable encoder's FFN width (its from_config comment:
# "use 1024 for deformable transformer encoder"); MASK_FORMER.DIM_FEEDFORWARD (2048) is the
# decoder's. The paper's 44.0M parameter count depends on it.
ENCODER_DIM_FEEDFORWARD = 1024


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, device: torch.device) -> Tensor:
        """(1, S, L, 2): the normalised centre of each pixel of each level, repeated for every
        level (no padding masks: Mask2Former passes all-valid masks, so valid ratios are 1)."""
        points = []
        for h, w in spatial_shapes.tolist():
            ys, xs = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h,
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w,
                indexing="ij",
            )
            points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        ref = torch.cat(points, 0)[None]  # (1, S, 2)
        return ref[:, :, None].expand(-1, -1, len(spatial_shapes), -1)

    def forward(self, src: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                pos: Tensor) -> Tensor:
        ref = self.get_reference_points(spatial_shapes, src.device).expand(src.shape[0], -1, -1, -1)
        out = src
        for layer in self.layers:
            out = layer(out, pos, ref, spatial_shapes, level_start_index)
        return out


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds sine position + learned level embeddings, runs the encoder."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[Tensor], pos_embeds: List[Tensor]
                ) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (memory (N, S, C), spatial_shapes (L, 2), level_start_index (L,))."""
        flat, flat_pos, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat.append(src.flatten(2).transpose(1, 2))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(flat, 1)
        pos_flatten = torch.cat(flat_pos, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, pos_flatten)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder on the transformer-in features (res3-res5), FPN up to stride
    ``common_stride`` (res2), a 1x1 conv to ``mask_dim`` for the mask features."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        transformer_n_points: int,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        transformer_in_features: List[str],
        common_stride: int,
    ):
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES {missing} are "
                f"not among the pixel decoder's inputs {sorted(input_shape)}")
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in by_stride]  # res2 .. res5
        self.feature_strides = [v.stride for _, v in by_stride]
        self.feature_channels = [v.channels for _, v in by_stride]
        tr = [(k, v) for k, v in by_stride if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in tr]  # res3 .. res5
        transformer_in_channels = [v.channels for _, v in tr]
        self.transformer_feature_strides = [v.stride for _, v in tr]
        self.transformer_num_feature_levels = len(tr)

        # one projection per level, lowest resolution first (res5 -> res3)
        self.input_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in transformer_in_channels[::-1]
        ])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the decoder always uses 3 scales
        self.common_stride = common_stride
        # FPN levels between the finest encoder level and common_stride (res2 for R50)
        self.num_fpn_levels = int(np.log2(min(self.transformer_feature_strides))
                                  - np.log2(common_stride))
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral, output = lateral_and_output_convs(in_channels, conv_dim, norm)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # top-down order (low to high resolution)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "transformer_dim_feedforward": head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(self, features: Dict[str, Tensor]
                         ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Returns (mask_features (N, mask_dim, H/4, W/4), the encoder's lowest-resolution
        output, the 3 multi-scale features lowest resolution first)."""
        # deformable attention runs in fp32 even under AMP, as in the original
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_features_fp32(features)

    def _forward_features_fp32(self, features: Dict[str, Tensor]
                               ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        y, spatial_shapes, level_start_index = self.transformer(srcs, pos)
        bs = y.shape[0]
        sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
        out = [
            z.transpose(1, 2).reshape(bs, -1, int(h), int(w))
            for z, (h, w) in zip(torch.split(y, sizes, dim=1), spatial_shapes.tolist())
        ]
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            cur = self.lateral_convs[idx](features[name].float())
            top = F.interpolate(out[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](cur + top))
        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features
