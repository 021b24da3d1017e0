"""Sine positional encoding of a feature map (DETR / Mask2Former).

The masked-attention decoder adds it to the keys of every masked cross-attention so that
the queries know *where* a pixel feature comes from; it has no parameters, so it does not
change the parameter budget nor the RNG stream that initialises the decoder.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """The "Attention is all you need" encoding, generalised to 2D images.

    Channels ``[0, num_pos_feats)`` encode the row (y), ``[num_pos_feats, 2*num_pos_feats)``
    the column (x); inside each half, even channels are sines and odd channels cosines of
    the coordinate divided by ``temperature ** (2 * (c // 2) / num_pos_feats)``.

    With ``normalize=True`` (what Mask2Former uses) a coordinate is the pixel centre
    ``(i + 0.5) / size`` scaled to ``[0, scale]``, so feature maps of different resolution
    share one code and a level's encoding does not depend on the image size.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``x``: (B, C, H, W); ``mask``: (B, H, W) bool, True on padding. -> (B, 2F, H, W)."""
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = self._interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
        pos_y = self._interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    @staticmethod
    def _interleave_sin_cos(angles: Tensor) -> Tensor:
        """(B, H, W, F) angles -> sin on even channels, cos on odd channels."""
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    def __repr__(self, _repr_indent: int = 4) -> str:
        body = [
            f"num_pos_feats: {self.num_pos_feats}",
            f"temperature: {self.temperature}",
            f"normalize: {self.normalize}",
            f"scale: {self.scale}",
        ]
        lines = [f"Positional encoding {self.__class__.__name__}"] + [" " * _repr_indent + b for b in body]
        return "\n".join(lines)
