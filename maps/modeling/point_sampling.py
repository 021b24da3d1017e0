"""Point sampling of masks (PointRend, used by Mask2Former's matcher and losses).

Mask2Former computes its mask costs and losses on a few thousand points instead of every
pixel: it cuts the training memory of the mask losses by about 3x (Mask2Former, Sec. 3.3)
and lets predictions (H/4) and targets (H) of different resolution meet on the same points,
because points live in normalised [0, 1] x [0, 1] coordinates.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["point_sample", "calculate_uncertainty", "get_uncertain_point_coords_with_randomness"]


def point_sample(input: Tensor, point_coords: Tensor, **kwargs) -> Tensor:
    """Bilinearly sample ``input`` at ``point_coords`` given in [0, 1] (x, y) coordinates.

    ``input``: (N, C, H, W); ``point_coords``: (N, P, 2) or (N, Hgrid, Wgrid, 2).
    Returns (N, C, P) or (N, C, Hgrid, Wgrid). ``kwargs`` go to ``F.grid_sample`` (callers
    pass ``align_corners=False`` so that point (0.5/W, 0.5/H) is the centre of pixel (0, 0)).
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    if add_dim:
        output = output.squeeze(3)
    return output


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a mask logit: ``-|logit|``, highest where the prediction is near 0.5.

    ``logits``: (R, 1, ...) class-agnostic mask logits; returns the same shape.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects one channel, got shape {tuple(logits.shape)}")
    return -torch.abs(logits.clone())


def get_uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    uncertainty_func: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Importance sampling of points (PointRend): mostly where the prediction is uncertain.

    Draws ``num_points * oversample_ratio`` uniform points, keeps the
    ``importance_sample_ratio * num_points`` most uncertain of them, and fills the rest with
    fresh uniform points so that confident regions are still supervised.

    ``coarse_logits``: (R, 1, H, W); ``uncertainty_func`` maps (R, 1, P) logits to (R, 1, P)
    uncertainties. Returns (R, num_points, 2) coordinates in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_boxes = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=device, generator=generator)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)  # (R, 1, num_sampled)

    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1).indices
    point_coords = torch.gather(point_coords, 1, idx[:, :, None].expand(-1, -1, 2))
    if num_random_points > 0:
        random_coords = torch.rand(num_boxes, num_random_points, 2, device=device, generator=generator)
        point_coords = torch.cat([point_coords, random_coords], dim=1)
    return point_coords
