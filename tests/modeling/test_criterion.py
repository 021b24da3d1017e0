"""Point sampling, Hungarian matching and the set criterion against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

import maps.modeling.criterion as criterion_module
from maps.config import get_maps_cfg
from maps.modeling.criterion import (
    SetCriterion,
    build_weight_dict,
    dice_loss,
    sigmoid_ce_loss,
)
from maps.modeling.matcher import (
    HungarianMatcher,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
)
from maps.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# --- point sampling ---------------------------------------------------------------------------
def test_point_sample_pixel_centres_and_midpoint():
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])  # (x, y)
    values = point_sample(image, coords, align_corners=False)
    assert values.shape == (1, 1, 4)
    assert torch.allclose(values[0, 0], torch.tensor([1.0, 2.0, 3.0, 2.5]))


def test_uncertain_points_concentrate_on_the_boundary():
    logits = torch.full((1, 1, 8, 8), -10.0)
    logits[..., 4:] = 10.0  # boundary at x = 0.5
    g = torch.Generator().manual_seed(0)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 16, 50, 0.75, generator=g)
    assert coords.shape == (1, 16, 2)
    assert ((coords[0, :12, 0] - 0.5).abs() < 1 / 16).all()  # 12 importance-sampled points
    assert ((coords[0, 12:, 0] - 0.5).abs() >= 1 / 16).any()  # 4 uniform ones spread out
    assert ((coords >= 0) & (coords <= 1)).all()


# --- costs and losses on fixed points ------------------------------------------------------------
def test_pairwise_costs_hand_computed():
    logits = torch.tensor([[0.0, LN3], [0.0, 0.0]])  # sigmoid [.5, .75] and [.5, .5]
    targets = torch.tensor([[1.0, 0.0]])
    dice = batch_dice_cost(logits, targets)
    assert torch.allclose(dice, torch.tensor([[1 - 2 / 3.25], [1 - 2 / 3]]))
    bce = batch_sigmoid_ce_cost(logits, targets)
    assert torch.allclose(bce, torch.tensor([[(LN2 + LN4) / 2], [LN2]]))


def test_mask_losses_hand_computed():
    logits = torch.tensor([[0.0, LN3]])
    targets = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(dice_loss(logits, targets, 2.0), torch.tensor((1 - 2 / 3.25) / 2))
    assert torch.allclose(sigmoid_ce_loss(logits, targets, 2.0), torch.tensor((LN2 + LN4) / 2 / 2))


def make_criterion(num_classes: int = 2, eos_coef: float = 0.1, num_points: int = 64) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        num_classes, matcher, build_weight_dict(2.0, 5.0, 5.0, 0), eos_coef,
        num_points=num_points, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )


def test_class_loss_weights_no_object_by_eos_coef():
    criterion = make_criterion(num_classes=2, eos_coef=0.1)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # 2 queries, classes {0, 1, no-object}
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 4, 4)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 -> class 0, query 1 -> no object
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, 1.0)["loss_ce"]
    nll_matched = -(2.0 - math.log(math.exp(2) + 2))
    nll_empty = -(1.0 - math.log(2 + math.e))
    assert loss.item() == pytest.approx((nll_matched + 0.1 * nll_empty) / 1.1, rel=1e-6)


def two_segment_case():
    """Image 4x4 with target 0 = left half (class 1) and target 1 = right half (class 0);
    2x2 predictions: query 0 soft-left, query 1 soft-right, query 2 empty."""
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 2:] = True
    targets = [{"labels": torch.tensor([1, 0]), "masks": masks}]
    pred_masks = torch.tensor([[[[LN3, 0.0], [LN3, 0.0]], [[-LN3, 0.0], [-LN3, 0.0]], [[-9.0, -9.0], [-9.0, -9.0]]]])
    pred_logits = torch.tensor([[[0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}, targets


def fixed_pixel_centres(coarse_logits, *args, **kwargs):
    """The 4 pixel centres of a 2x2 map, for every mask (replaces importance sampling)."""
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    return centres.expand(coarse_logits.shape[0], 4, 2)


def test_mask_losses_on_fixed_points_normalised_by_number_of_masks(monkeypatch):
    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", fixed_pixel_centres)
    outputs, targets = two_segment_case()
    torch.manual_seed(0)
    losses = make_criterion()(outputs, targets)
    # target points: t0 = [1, 0, 1, 0], t1 = [0, 1, 0, 1]
    # query 0: sigmoid [.75, .5, .75, .5] -> dice 1 - 4/5.5, BCE (-ln .75 + ln 2) / 2
    # query 1: sigmoid [.25, .5, .25, .5] -> dice 1 - 3/4.5, BCE (-ln .75 + ln 2) / 2
    bce = (-math.log(0.75) + LN2) / 2
    assert losses["loss_dice"].item() == pytest.approx(((1 - 4 / 5.5) + (1 - 3 / 4.5)) / 2, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx((bce + bce) / 2, rel=1e-5)


# --- matching ---------------------------------------------------------------------------------
def test_matcher_pairs_perfect_predictions_with_their_targets():
    torch.manual_seed(0)
    num_classes, num_queries = 4, 6
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, :4, 4:] = True
    masks[2, 4:] = True
    labels = torch.tensor([2, 0, 2])  # two targets of the same class: masks must decide
    perm = [4, 1, 3]                  # target j is predicted by query perm[j]
    pred_masks = torch.full((1, num_queries, 8, 8), -10.0)
    pred_logits = torch.zeros(1, num_queries, num_classes + 1)
    pred_logits[0, :, num_classes] = 5.0
    for j, q in enumerate(perm):
        pred_masks[0, q] = torch.where(masks[j], 10.0, -10.0)
        pred_logits[0, q] = 0.0
        pred_logits[0, q, labels[j]] = 5.0
    targets = [{"labels": labels, "masks": masks}, {"labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0]}]
    outputs = {"pred_logits": pred_logits.repeat(2, 1, 1), "pred_masks": pred_masks.repeat(2, 1, 1, 1)}
    outputs["pred_logits"][1, :, num_classes] = 10.0  # the image without targets predicts "no object"
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=100)
    (src, tgt), (src_empty, tgt_empty) = matcher(outputs, targets)
    assert sorted(zip(src.tolist(), tgt.tolist())) == sorted((q, j) for j, q in enumerate(perm))
    assert src_empty.numel() == 0 and tgt_empty.numel() == 0

    # and the criterion prefers them to a wrong assignment
    criterion = make_criterion(num_classes=num_classes)
    good = criterion(outputs, targets)
    shifted = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"].roll((2, 2), dims=(-2, -1))}
    bad = criterion(shifted, targets)
    # importance sampling puts most points on mask boundaries, so even perfect masks keep some loss
    assert good["loss_dice"] < 0.5 * bad["loss_dice"]
    assert good["loss_mask"] < 0.5 * bad["loss_mask"]
    assert good["loss_ce"] < 0.1


def test_matcher_rejects_non_finite_costs():
    outputs, targets = two_segment_case()
    outputs["pred_masks"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher(num_points=16)(outputs, targets)


# --- the full criterion ------------------------------------------------------------------------
def test_deep_supervision_losses_have_suffixes():
    outputs, targets = two_segment_case()
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"].clone(), "pred_masks": outputs["pred_masks"].clone()} for _ in range(2)
    ]
    losses = make_criterion()(outputs, targets)
    base = {"loss_ce", "loss_mask", "loss_dice"}
    assert set(losses) == base | {f"{k}_{i}" for k in base for i in range(2)}
    assert losses["loss_ce_1"].item() == pytest.approx(losses["loss_ce"].item())


def test_no_targets_gives_finite_losses_and_gradients():
    pred_masks = torch.randn(2, 3, 4, 4, requires_grad=True)
    pred_logits = torch.randn(2, 3, 3, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}
    losses = make_criterion()({"pred_logits": pred_logits, "pred_masks": pred_masks}, [empty, empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    expected_ce = torch.nn.functional.cross_entropy(pred_logits.transpose(1, 2), torch.full((2, 3), 2))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(pred_masks.grad).all() and torch.isfinite(pred_logits.grad).all()


def test_targets_of_different_sizes_are_padded():
    _, targets = two_segment_case()
    small = {"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 3, dtype=torch.bool)}
    outputs = {"pred_logits": torch.randn(2, 3, 3), "pred_masks": torch.randn(2, 3, 2, 2)}
    losses = make_criterion()(outputs, [targets[0], small])
    assert all(torch.isfinite(v) for v in losses.values())


def test_built_from_config():
    cfg = get_maps_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    criterion = SetCriterion(cfg)
    assert criterion.num_classes == 133
    assert criterion.empty_weight.shape == (134,) and criterion.empty_weight[-1].item() == pytest.approx(0.1)
    assert len(criterion.weight_dict) == 3 * 10  # final + 9 aux outputs
    assert criterion.weight_dict["loss_ce_8"] == 2.0 and criterion.weight_dict["loss_dice_0"] == 5.0
    assert criterion.num_points == 112 * 112
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice) == (2.0, 5.0, 5.0)
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    assert set(SetCriterion(cfg).weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}
