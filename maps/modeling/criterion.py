"""Set criterion of Mask2Former: classification and point-sampled mask losses.

After Hungarian matching, every prediction gets a class target (its matched segment's
class, or "no object"), and every matched prediction a mask target. Mask losses (sigmoid
BCE and dice) are computed on ``num_points`` importance-sampled points per mask, and all
mask losses are divided by the number of target masks in the batch, averaged over
processes, so the loss scale does not depend on how a batch is split across GPUs.

The criterion returns *unweighted* losses; the meta-architecture multiplies them by
``weight_dict`` (and drops the ones it has no weight for), as Mask2Former does.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from maps.modeling.matcher import HungarianMatcher
from maps.modeling.point_sampling import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample

__all__ = ["SetCriterion", "dice_loss", "sigmoid_ce_loss", "build_weight_dict"]

Indices = List[Tuple[Tensor, Tensor]]


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of ``1 - (2 |x*y| + 1) / (|x| + |y| + 1)``, divided by ``num_masks``.

    ``inputs`` (N, P) logits; ``targets`` (N, P) in [0, 1].
    """
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Per-mask mean of the point-wise sigmoid BCE, summed over masks, over ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def build_weight_dict(
    class_weight: float, mask_weight: float, dice_weight: float, num_aux: int
) -> Dict[str, float]:
    """Loss weights, repeated with ``_i`` suffixes for the ``num_aux`` deep-supervision outputs."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weight_dict = dict(base)
    for i in range(num_aux):
        weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return weight_dict


def _pad_masks(masks: Sequence[Tensor]) -> Tensor:
    """Concatenate per-image (n_i, H_i, W_i) masks into (sum n_i, H, W), zero-padded bottom/right.

    Targets of one batch normally share the padded image size already; padding keeps the
    criterion correct (as Mask2Former's nested tensors do) when they do not.
    """
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    padded = [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks]
    return torch.cat(padded, dim=0)


def _num_masks_across_processes(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> float:
    """Number of target masks per process, averaged over processes, at least 1."""
    num_masks = torch.as_tensor(
        [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
    )
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        world_size = dist.get_world_size()
    return torch.clamp(num_masks / world_size, min=1).item()


class SetCriterion(nn.Module):
    """Hungarian-matched losses of Mask2Former, with deep supervision on ``aux_outputs``."""

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        """
        Args:
            num_classes: number of real classes; index ``num_classes`` is "no object".
            matcher: assigns predictions to targets (a :class:`HungarianMatcher`).
            weight_dict: loss name -> weight, kept here for the meta-architecture.
            eos_coef: class weight of "no object" in the CE (most queries are unmatched).
            losses: which of "labels", "masks" to compute.
            num_points, oversample_ratio, importance_sample_ratio: point sampling of masks.
        """
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {sorted(self._LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        mf = cfg.MODEL.MASK_FORMER
        num_aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "matcher": HungarianMatcher(cfg),
            "weight_dict": build_weight_dict(mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, num_aux),
            "eos_coef": mf.NO_OBJECT_WEIGHT,
            "losses": ["labels", "masks"],
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
        }

    # --- the losses -------------------------------------------------------------------
    def loss_labels(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """Cross-entropy over C+1 classes for every query; unmatched queries target "no object"."""
        src_logits = outputs["pred_logits"].float()
        batch_idx, src_idx = self._src_permutation_idx(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        target_classes[batch_idx, src_idx] = matched_classes.to(src_logits.device)
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """Sigmoid BCE and dice of matched masks on importance-sampled points."""
        batch_idx, src_idx = self._src_permutation_idx(indices)
        src_masks = outputs["pred_masks"][batch_idx, src_idx]
        if src_masks.shape[0] == 0:
            # no target in the batch: zero losses that still reach the graph (DDP needs it)
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        target_masks = _pad_masks(
            [t["masks"][j].to(src_masks) for t, (_, j) in zip(targets, indices)]
        )
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]

        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks.float(),
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks.float(), point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks.float(), point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    _LOSSES = {"labels": loss_labels, "masks": loss_masks}

    @staticmethod
    def _src_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        """(batch index, query index) of every matched prediction, in matching order."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def get_loss(
        self,
        loss: str,
        outputs: Dict[str, Tensor],
        targets: Sequence[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        return self._LOSSES[loss](self, outputs, targets, indices, num_masks)

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Losses of the final prediction and, with ``_i`` suffixes, of every aux output.

        ``outputs``: ``pred_logits`` (B, Q, C+1), ``pred_masks`` (B, Q, h, w) and optional
        ``aux_outputs`` (list of dicts of the same two keys); ``targets``: per image
        ``labels`` (n,) long and ``masks`` (n, H, W) bool or float.
        """
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_masks = _num_masks_across_processes(targets, final["pred_logits"].device)

        losses: Dict[str, Tensor] = {}
        indices = self.matcher(final, targets)
        for loss in self.losses:
            losses.update(self.get_loss(loss, final, targets, indices, num_masks))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux, targets)
            for loss in self.losses:
                aux_losses = self.get_loss(loss, aux, targets, indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def __repr__(self) -> str:
        lines = [
            f"matcher: {self.matcher!r}",
            f"losses: {self.losses}",
            f"weight_dict: {self.weight_dict}",
            f"num_classes: {self.num_classes}",
            f"eos_coef: {self.eos_coef}",
            f"num_points: {self.num_points}",
            f"oversample_ratio: {self.oversample_ratio}",
            f"importance_sample_ratio: {self.importance_sample_ratio}",
        ]
        return "Criterion " + self.__class__.__name__ + "\n    " + "\n    ".join(lines)
