"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch.

Mask2Former ships a CUDA kernel for this operator and falls back to a ``grid_sample``
implementation on the CPU. Here the ``grid_sample`` path is the only one: it runs wherever
PyTorch runs (CPU, any GPU, no compiled extension), which is what a laptop test suite and a
cluster without a matching CUDA toolkit both need. The module's parameters and their names
are the original's, so Mask2Former checkpoints load unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn_core_pytorch"]


def ms_deform_attn_core_pytorch(
    value: Tensor,
    value_spatial_shapes: Sequence[Tuple[int, int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level of ``value`` at the given locations and sum with the given weights.

    Args:
        value: (N, S, M, D) values of all levels flattened and concatenated
            (S = sum of H_l * W_l), M heads of width D.
        value_spatial_shapes: (L, 2) the (H_l, W_l) of each level, in the order of ``value``.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1] of each of the
            P points per head, query and level; 0 and 1 are the outer edges of the map
            (``align_corners=False``), points outside read zeros.
        attention_weights: (N, Lq, M, L, P) weights of the points (softmax over L * P).

    Returns:
        (N, Lq, M * D) the weighted sums, heads concatenated.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1] coordinates
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W): one "image" per (batch, head)
        v = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(n * m, lq, num_points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    out = (samples * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on each
    of ``n_levels`` feature maps, per head: linear cost in the number of pixels, which is
    what lets the pixel decoder attend over res3-res5 at once."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on rings around the reference point, one
        direction per head and radius 1..P per point, with uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Optional[Tensor] = None,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) in [0, 1] per level.
            input_flatten: (N, S, C) all levels flattened and concatenated.
            input_spatial_shapes: (L, 2) long, (H_l, W_l).
            input_level_start_index: (L,) unused here (the CUDA kernel's argument; kept for
                the original signature).
            input_padding_mask: (N, S) True at padding pixels, whose values become zero.

        Returns:
            (N, Lq, C)
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        expected = int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum())
        if expected != s:
            raise ValueError(f"input_flatten has {s} positions; spatial shapes sum to {expected}")
        if reference_points.shape[-1] != 2:
            raise ValueError("only 2-d reference points are supported (the encoder's case)")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(
            n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by that level's (W, H)
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :].to(offsets.dtype))
        out = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)
