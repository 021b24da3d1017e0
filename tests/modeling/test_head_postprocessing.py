"""Semantic, panoptic and instance inference on hand-made predictions."""
from __future__ import annotations

import math

import torch

from maps.modeling.postprocessing import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    sem_seg_postprocess,
    semantic_inference,
)

BIG = 12.0  # a logit whose softmax / sigmoid is ~1


def _onehot_logits(classes, num_classes):
    """(Q, C+1) logits whose softmax puts ~all mass on the given class (C = no object)."""
    out = torch.zeros(len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        out[q, c] = BIG
    return out


def _column_mask(h, w, cols, inside=BIG, outside=-BIG):
    m = torch.full((h, w), outside)
    m[:, cols] = inside
    return m


def test_panoptic_keeps_confident_queries_and_merges_stuff():
    num_classes = 3  # class 0 thing, 1 and 2 stuff
    mask_cls = _onehot_logits([0, 1, 1, 3], num_classes)
    mask_cls = torch.cat([mask_cls, torch.zeros(1, num_classes + 1)])  # q4: uniform, score 0.25
    mask_pred = torch.stack([
        _column_mask(2, 3, [0]),      # thing
        _column_mask(2, 3, [1]),      # stuff class 1
        _column_mask(2, 3, [2]),      # stuff class 1 again -> same segment
        _column_mask(2, 3, [0, 1, 2]),  # "no object": dropped
        _column_mask(2, 3, [0, 1, 2]),  # not confident: dropped
    ])
    seg, info = panoptic_inference(mask_cls, mask_pred, num_classes=num_classes, thing_ids={0},
                                   object_mask_threshold=0.8, overlap_threshold=0.8)
    assert seg.dtype == torch.int32
    assert seg.tolist() == [[1, 2, 2], [1, 2, 2]]
    assert info == [{"id": 1, "isthing": True, "category_id": 0},
                    {"id": 2, "isthing": False, "category_id": 1}]


def test_panoptic_overlap_threshold_drops_mostly_covered_segments():
    num_classes = 3
    mask_cls = _onehot_logits([0, 2], num_classes)
    # q0 covers the whole 2x3 image weakly (sigmoid(2) = 0.88); q1 takes the left column
    mask_pred = torch.stack([torch.full((2, 3), 2.0), _column_mask(2, 3, [0])])
    seg, info = panoptic_inference(mask_cls, mask_pred, num_classes=num_classes, thing_ids={0, 2},
                                   object_mask_threshold=0.8, overlap_threshold=0.8)
    # q0 keeps 4 of its 6 pixels: 0.67 < 0.8 -> dropped; q1 becomes segment 1
    assert seg.tolist() == [[1, 0, 0], [1, 0, 0]]
    assert info == [{"id": 1, "isthing": True, "category_id": 2}]
    seg, info = panoptic_inference(mask_cls, mask_pred, num_classes=num_classes, thing_ids={0, 2},
                                   object_mask_threshold=0.8, overlap_threshold=0.5)
    assert seg.tolist() == [[2, 1, 1], [2, 1, 1]]
    assert [s["category_id"] for s in info] == [0, 2]


def test_panoptic_with_nothing_confident_is_all_void():
    mask_cls = torch.zeros(3, 5)  # uniform: score 0.2 each
    seg, info = panoptic_inference(mask_cls, torch.randn(3, 4, 4), num_classes=4, thing_ids={0},
                                   object_mask_threshold=0.8, overlap_threshold=0.8)
    assert info == [] and seg.shape == (4, 4) and int(seg.abs().sum()) == 0


def test_semantic_inference_is_probability_weighted_sum_of_masks():
    mask_cls = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # [.5 .25 .25], [1/3]*3
    mask_pred = torch.stack([_column_mask(1, 2, [0]), _column_mask(1, 2, [1])])
    out = semantic_inference(mask_cls, mask_pred)
    assert out.shape == (2, 1, 2)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.5, 0.25]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 0, 1], torch.tensor([1 / 3, 1 / 3]), atol=1e-4, rtol=0)


def test_instance_inference_topk_over_queries_and_classes():
    # probs q0: [.6 .3 .1 0], q1: [.25 .15 .1 .5] (last = no object)
    probs = torch.tensor([[0.6, 0.3, 0.1 - 1e-6, 1e-6], [0.25, 0.15, 0.1, 0.5]])
    mask_cls = probs.log()
    mask_pred = torch.tensor([[[2.0, -1.0], [-1.0, -1.0]],    # one positive pixel
                              [[1.0, 3.0], [-2.0, -2.0]]])    # two positive pixels
    res = instance_inference(mask_cls, mask_pred, num_classes=3, topk=3)
    order = res.scores.argsort(descending=True)
    classes = res.pred_classes[order].tolist()
    assert len(res) == 3 and classes == [0, 1, 0]  # (q0,c0) .6, (q0,c1) .3, (q1,c0) .25
    s = torch.sigmoid
    expected = torch.tensor([0.6 * s(torch.tensor(2.0)), 0.3 * s(torch.tensor(2.0)),
                             0.25 * (s(torch.tensor(1.0)) + s(torch.tensor(3.0))) / 2])
    torch.testing.assert_close(res.scores[order], expected, atol=1e-4, rtol=0)
    assert res.pred_masks.shape == (3, 2, 2)
    assert res.pred_boxes.tensor[order][0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_instance_inference_drops_stuff_when_thing_ids_given():
    probs = torch.tensor([[0.6, 0.3, 0.05, 0.05]])
    res = instance_inference(probs.log(), torch.ones(1, 2, 2), num_classes=3, topk=3,
                             thing_ids={1})
    assert res.pred_classes.tolist() == [1]
    # topk larger than Q x C is clamped
    res = instance_inference(probs.log(), torch.ones(1, 2, 2), num_classes=3, topk=100)
    assert len(res) == 3


def test_masks_to_boxes_covers_pixels_and_zeroes_empty_masks():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 3:5] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[3.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    assert masks_to_boxes(masks[:0]).shape == (0, 4)


def test_sem_seg_postprocess_crops_padding_then_resizes():
    result = torch.full((2, 4, 4), 100.0)
    result[:, :2, :3] = torch.tensor([1.0, 2.0]).view(2, 1, 1)  # the real image is 2x3
    out = sem_seg_postprocess(result, (2, 3), 4, 6)
    assert out.shape == (2, 4, 6)
    torch.testing.assert_close(out[0], torch.ones(4, 6))
    torch.testing.assert_close(out[1], torch.full((4, 6), 2.0))
