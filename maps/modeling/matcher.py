"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former).

The decoder predicts a set of ``Q`` (class, mask) pairs in no particular order; the loss
needs a one-to-one assignment of predictions to the ``n <= Q`` targets. The matcher finds
the assignment of least total cost with ``scipy.optimize.linear_sum_assignment``; unmatched
predictions learn the "no object" class. Mask costs are computed on the same random points
for predictions and targets, as the losses are, so matching and loss agree.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from maps.modeling.point_sampling import point_sample

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost"]


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss: ``inputs`` (N, P) logits, ``targets`` (M, P) in [0, 1] -> (N, M).

    ``1 - (2 |x * y| + 1) / (|x| + |y| + 1)``, with x = sigmoid(logits); the +1 keeps the
    cost defined for empty masks.
    """
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean binary cross-entropy: ``inputs`` (N, P) logits, ``targets`` (M, P) -> (N, M).

    BCE is linear in the target, so the (N, M) matrix is two matrix products of the
    per-point losses against "target is 1" and "target is 0": no (N, M, P) tensor is built.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)
    return loss / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, image by image.

    Cost = ``cost_class * (-p[target class]) + cost_mask * BCE + cost_dice * dice``, the
    mask terms on ``num_points`` uniform random points shared by predictions and targets.
    """

    @configurable
    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 112 * 112,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        mf = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mf.CLASS_WEIGHT,
            "cost_mask": mf.MASK_WEIGHT,
            "cost_dice": mf.DICE_WEIGHT,
            "num_points": mf.TRAIN_NUM_POINTS,
        }

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        """Cost of every (prediction, target) pair of one image: (Q, n), on the CPU.

        ``pred_logits`` (Q, C+1), ``pred_masks`` (Q, h, w) logits, ``labels`` (n,),
        ``masks`` (n, H, W).
        """
        if labels.numel() == 0:
            return torch.zeros(pred_logits.shape[0], 0)
        cost_class = -pred_logits.float().softmax(-1)[:, labels]

        out_mask = pred_masks[:, None].float()
        tgt_mask = masks[:, None].to(out_mask)
        point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
        tgt_points = point_sample(
            tgt_mask, point_coords.expand(tgt_mask.shape[0], -1, -1), align_corners=False
        ).squeeze(1)
        out_points = point_sample(
            out_mask, point_coords.expand(out_mask.shape[0], -1, -1), align_corners=False
        ).squeeze(1)
        with torch.autocast(device_type=out_mask.device.type, enabled=False):
            cost_mask = batch_sigmoid_ce_cost(out_points, tgt_points)
            cost_dice = batch_dice_cost(out_points, tgt_points)
        cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
        return cost.cpu()

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match a batch.

        ``outputs``: ``pred_logits`` (B, Q, C+1) and ``pred_masks`` (B, Q, h, w);
        ``targets``: per image ``labels`` (n,) and ``masks`` (n, H, W).
        Returns per image ``(pred_idx, target_idx)``, two int64 tensors of length
        ``min(Q, n)``: prediction ``pred_idx[j]`` is matched to target ``target_idx[j]``.
        """
        batch_size = outputs["pred_logits"].shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch_size}")
        indices = []
        for b in range(batch_size):
            cost = self.cost_matrix(
                outputs["pred_logits"][b], outputs["pred_masks"][b], targets[b]["labels"], targets[b]["masks"]
            )
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite matching cost for image {b} "
                    "(NaN/inf in pred_logits or pred_masks: the training diverged)"
                )
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64))
            )
        return indices

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )
