"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Two implementations of one operator:

* the ``grid_sample`` path (:func:`ms_deform_attn_core_pytorch`): runs wherever PyTorch
  runs (CPU, any GPU, no compiled extension), which is what a laptop test suite and a
  cluster without a matching CUDA toolkit both need;
* Mask2Former's compiled CUDA kernel, the ``MultiScaleDeformableAttention`` extension its
  ``ops/make.sh`` builds: used for CUDA tensors when that module is importable (it is faster
  and needs less memory at the paper's resolution), in float32 as Mask2Former runs it.

:func:`deform_attn_backend` says which one a device gets; each module records the one its
last forward used (``last_backend``) so a benchmark can report it. ``MAPS_MSDA_PYTORCH=1``
forces the PyTorch path. The module's parameters and their names are the original's, so
Mask2Former checkpoints load unchanged.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["MSDeformAttn", "ms_deform_attn_core_pytorch", "deform_attn_backend",
           "KERNEL", "PYTORCH"]

KERNEL, PYTORCH = "cuda-kernel", "pytorch"
try:  # Mask2Former's compiled op (mask2former/modeling/pixel_decoder/ops), if installed
    import MultiScaleDeformableAttention as _MSDA  # type: ignore[import-not-found]
except Exception:  # not built, or built against another torch/CUDA
    _MSDA = None
IM2COL_STEP = 128  # Mask2Former's value


def deform_attn_backend(device: torch.device | str) -> str:
    """``"cuda-kernel"`` when tensors on ``device`` go through the compiled op, else
    ``"pytorch"`` (CPU, no extension, or ``MAPS_MSDA_PYTORCH=1``)."""
    device = torch.device(device)
    if _MSDA is None or device.type != "cuda" or os.environ.get("MAPS_MSDA_PYTORCH") == "1":
        return PYTORCH
    return KERNEL


class _KernelFunction(torch.autograd.Function):
    """The compiled forward and backward (float32), as Mask2Former's MSDeformAttnFunction."""

    @staticmethod
    def forward(ctx, value, shapes, level_start, locations, weights, im2col_step: int):
        ctx.im2col_step = im2col_step
        out = _MSDA.ms_deform_attn_forward(value, shapes, level_start, locations, weights,
                                           im2col_step)
        ctx.save_for_backward(value, shapes, level_start, locations, weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, level_start, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _MSDA.ms_deform_attn_backward(
            value, shapes, level_start, locations, weights, grad_output.contiguous(),
            ctx.im2col_step)
        return grad_value, None, None, grad_locations, grad_weights, None


def _kernel_core(value: Tensor, shapes: Tensor, level_start: Optional[Tensor], locations: Tensor,
                 weights: Tensor) -> Tensor:
    shapes = shapes.to(device=value.device, dtype=torch.long)
    if level_start is None:
        sizes = shapes[:, 0] * shapes[:, 1]
        level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    out = _KernelFunction.apply(value.float().contiguous(), shapes.contiguous(),
                                level_start.to(shapes).contiguous(),
                                locations.float().contiguous(), weights.float().contiguous(),
                                IM2COL_STEP)
    return out.to(value.dtype)


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
        self.last_backend: Optional[str] = None
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
            input_level_start_index: (L,) first position of each level in ``input_flatten``
                (the CUDA kernel's argument; computed when None; unused by the PyTorch path).
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
        self.last_backend = deform_attn_backend(value.device)
        if self.last_backend == KERNEL:
            out = _kernel_core(value, input_spatial_shapes, input_level_start_index, locations,
                               weights)
        else:
            out = ms_deform_attn_core_pytorch(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)
