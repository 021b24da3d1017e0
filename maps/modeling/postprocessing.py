"""Semantic, panoptic and instance inference from mask classification (Mask2Former).

Each query predicts a class distribution over C categories + "no object" (``mask_cls``,
(Q, C+1) logits) and a mask (``mask_pred``, (Q, H, W) logits). The three tasks read the same
predictions differently; these functions are Mask2Former's, as plain functions of tensors so
they can be tested on hand-made inputs.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = [
    "sem_seg_postprocess",
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "masks_to_boxes",
]


def sem_seg_postprocess(result: Tensor, img_size: Tuple[int, int], output_height: int,
                        output_width: int) -> Tensor:
    """Crop the padding of the batched image away, then resize to the original image size.

    Args:
        result: (C, H_pad, W_pad) predictions at the padded input's resolution.
        img_size: (h, w) of the input image before padding.
        output_height, output_width: the size the user wants (the dataset's "height"/"width").
    """
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear",
                         align_corners=False)[0]


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """(C, H, W) per-class score: sum over queries of P(class) * sigmoid(mask)."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    thing_ids: Collection[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[Tensor, List[Dict]]:
    """Non-overlapping segments from the confident queries.

    Queries whose best class is "no object" or whose score is at most
    ``object_mask_threshold`` are dropped; each pixel goes to the kept query with the
    highest score * mask probability; a query keeps its segment only if at least
    ``overlap_threshold`` of its own mask (probability >= 0.5) survives that competition.
    Stuff segments of the same class are merged into one.

    Returns:
        (panoptic_seg (H, W) int32, 0 = void, segments_info [{"id", "isthing", "category_id"}])
        with ``category_id`` the contiguous class id.
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_prob = mask_pred.sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_prob[keep]
    h, w = mask_prob.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    thing_ids = set(int(t) for t in thing_ids)
    stuff_segment_id: Dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k].item())
        isthing = pred_class in thing_ids
        won = cur_mask_ids == k
        own = cur_masks[k] >= 0.5
        mask = won & own
        mask_area, original_area = int(won.sum().item()), int(own.sum().item())
        if mask_area == 0 or original_area == 0 or int(mask.sum().item()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing:
            if pred_class in stuff_segment_id:  # merge stuff regions of one class
                panoptic_seg[mask] = stuff_segment_id[pred_class]
                continue
            stuff_segment_id[pred_class] = current_id + 1
        current_id += 1
        panoptic_seg[mask] = current_id
        segments_info.append({"id": current_id, "isthing": bool(isthing),
                              "category_id": pred_class})
    return panoptic_seg, segments_info


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, 4) XYXY boxes around each mask (pixel edges); zeros if empty.

    Mask2Former leaves ``pred_boxes`` at zero (its per-mask loop is slow); this vectorised
    version costs two reductions, so the boxes are real for visualisation and box AP.
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0.0
    return boxes


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    topk: int,
    thing_ids: Collection[int] | None = None,
) -> Instances:
    """Top-k (query, class) pairs as instances.

    Every query may yield several instances of different classes: the k highest of the
    Q x C class probabilities are kept. With ``thing_ids`` given (panoptic training), stuff
    classes are dropped. The final score is the class probability times the mean mask
    probability inside the binarised mask.
    """
    q = mask_cls.shape[0]
    image_size = tuple(mask_pred.shape[-2:])
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(q)
    k = min(topk, scores.numel())
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(k, sorted=False)
    labels_per_image = labels[topk_indices]
    mask_pred = mask_pred[topk_indices // num_classes]
    if thing_ids is not None:
        things = torch.as_tensor(sorted(int(t) for t in thing_ids), dtype=labels.dtype,
                                 device=labels.device)
        keep = torch.isin(labels_per_image, things)
        scores_per_image = scores_per_image[keep]
        labels_per_image = labels_per_image[keep]
        mask_pred = mask_pred[keep]
    result = Instances(image_size)
    binary = mask_pred > 0
    result.pred_masks = binary.float()
    result.pred_boxes = Boxes(masks_to_boxes(binary))
    flat = result.pred_masks.flatten(1)
    mask_scores = (mask_pred.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    result.scores = scores_per_image * mask_scores
    result.pred_classes = labels_per_image
    return result
