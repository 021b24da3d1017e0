"""Mask2Former's masked-attention transformer decoder, with MAPS memory fusion.

Each of the 9 decoder layers lets the object queries attend to one level of the pixel
decoder's multi-scale features (round robin, lowest resolution first), restricted to the
foreground of the mask the previous layer predicted (masked attention), then to each other
(self-attention), then applies an FFN. Class and mask predictions are made on the learnable
queries and after every layer (deep supervision).

MAPS (paper Sec. 3.3) adds, in the layers given by ``MODEL.MAPS.SCENE_LAYERS`` /
``OBJECT_LAYERS``, a cross-attention to the retrieved scene / object memory
(:mod:`maps.modeling.memory_fusion`). Table 4's "Mask2Former (N)" instead adds plain
self-attention layers at the same place. Both kinds of modules are created after all of
Mask2Former's, so with memory disabled the decoder is exactly Mask2Former: same parameters,
same random initialisation for a seed, same outputs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.attention import ResidualAttention, with_pos, xavier_init
from maps.modeling.memory_fusion import MemoryFusion
from maps.modeling.position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer modules of MaskFormer heads; called with
``(cfg, in_channels, mask_classification)``.
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        known = sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)
        raise ConfigError(f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = {name!r} is not one of {known}")
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {name}")


class SelfAttentionLayer(ResidualAttention):
    """Self-attention among the queries, residual, LayerNorm (post-norm unless normalize_before)."""

    attn_name = "self_attn"

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        x = self._normed(tgt)
        q = k = with_pos(x, query_pos)
        update = self.self_attn(q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        return self._residual(tgt, update)


class CrossAttentionLayer(ResidualAttention):
    """Queries attending to image features (masked by ``memory_mask``), residual, LayerNorm."""

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        update = self.multihead_attn(
            query=with_pos(self._normed(tgt), query_pos),
            key=with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        return self._residual(tgt, update)


class FFNLayer(nn.Module):
    """Two-layer feed-forward block, residual, LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """A plain multi-layer perceptron (ReLU between layers), e.g. the mask embedding."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's decoder (Cheng et al., CVPR 2022), optionally with MAPS memory."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        memory_fusion: Optional[Dict[str, object]] = None,
        extra_self_attn_layers: Sequence[int] = (),
    ) -> None:
        """
        Args:
            in_channels: channels of the multi-scale features.
            mask_classification: predict classes (always True for Mask2Former).
            num_classes, hidden_dim, num_queries, nheads, dim_feedforward, pre_norm, mask_dim:
                as Mask2Former.
            dec_layers: number of masked-attention layers (config DEC_LAYERS - 1).
            enforce_input_project: add a 1x1 conv even when in_channels == hidden_dim.
            memory_fusion: keyword arguments of :class:`MemoryFusion` (MAPS), or None for
                Mask2Former. Arguments, not a module, so that it is created last.
            extra_self_attn_layers: 0-based layers that get an extra plain self-attention
                where memory would go (Table 4 "Mask2Former (N)").
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = mask_classification

        # ---- Mask2Former's modules; keep their creation order (the RNG stream) unchanged ----
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)   # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions

        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                self.input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                weight_init.c2_xavier_fill(self.input_proj[-1])
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

        # ---- MAPS / Table 4 additions: created last, so Mask2Former's init is untouched ----
        self.extra_self_attn_layers = sorted({int(i) for i in extra_self_attn_layers})
        bad = [i for i in self.extra_self_attn_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(
                f"MODEL.MAPS.EXTRA_SELF_ATTN_LAYERS has layers {bad}; the decoder has "
                f"{self.num_layers} layers (0-based)"
            )
        self.extra_self_attention = nn.ModuleDict(
            {
                str(i): SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
                for i in self.extra_self_attn_layers
            }
        )
        self.memory_fusion: Optional[MemoryFusion] = (
            MemoryFusion(**memory_fusion) if memory_fusion is not None else None
        )

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> Dict[str, object]:
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ConfigError(
                f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1 (layers + the prediction on the "
                f"learnable queries), got {mf.DEC_LAYERS}"
            )
        maps_cfg = cfg.MODEL.MAPS
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # DEC_LAYERS counts the prediction on the learnable queries as a layer
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "memory_fusion": MemoryFusion.from_config(cfg) if maps_cfg.ENABLED else None,
            "extra_self_attn_layers": list(maps_cfg.EXTRA_SELF_ATTN_LAYERS),
        }

    def forward(
        self,
        x: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        memory: Optional[MemoryTokens] = None,
    ) -> Dict[str, object]:
        """
        Args:
            x: 3 multi-scale features (B, C, Hi, Wi), lowest resolution first.
            mask_features: (B, mask_dim, H/4, W/4) per-pixel embeddings.
            mask: unused (Mask2Former's signature).
            memory: retrieved tokens for MAPS; ignored when memory fusion is off, and
                None means "no memory" (every image passes its memory layers unchanged).
        Returns:
            ``pred_logits`` (B, Q, C+1), ``pred_masks`` (B, Q, H/4, W/4) and ``aux_outputs``,
            the same for the learnable queries and every layer but the last.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        del mask
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))  # (HW, B, C)
            level = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(level.permute(2, 0, 1))

        batch = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, C)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        prepared = self.memory_fusion.prepare(memory) if self.memory_fusion is not None else {}

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            # a query whose mask is empty at this level attends to the whole level instead
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None,
                pos=pos[level_index], query_pos=query_embed,
            )
            # MAPS places its memory cross-attention "within the Transformer decoder block"
            # (Sec. 3.3) without saying where; we put it after the masked cross-attention, so
            # the queries first look at this image, and before the self-attention, so what a
            # query took from memory is shared with the other queries in the same layer.
            if self.memory_fusion is not None:
                output = self.memory_fusion(i, output, prepared, query_pos=query_embed)
            if str(i) in self.extra_self_attention:
                output = self.extra_self_attention[str(i)](output, query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)

            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels]
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": self._aux_outputs(predictions_class, predictions_mask),
        }

    def forward_prediction_heads(self, output: Tensor, mask_features: Tensor, attn_mask_target_size):
        """Class logits, mask logits and the next layer's attention mask from the queries.

        The attention mask is True (= not attended) where the predicted mask, resized to the
        next level, is below 0.5; one copy per head, as ``nn.MultiheadAttention`` wants.
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach()

    def _aux_outputs(self, outputs_class: List[Tensor], outputs_masks: List[Tensor]) -> List[Dict[str, Tensor]]:
        return [
            {"pred_logits": c, "pred_masks": m} for c, m in zip(outputs_class[:-1], outputs_masks[:-1])
        ]
