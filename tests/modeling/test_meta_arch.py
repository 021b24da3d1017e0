"""The MAPS meta-architecture end to end on the tiny configuration (CPU, seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.structures import BitMasks, ImageList, Instances

import maps.data  # noqa: F401  (registers synthetic_train, whose metadata tells things from stuff)
from maps.errors import ConfigError
from maps.modeling import MAPS, build_model, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "synthetic"
NUM_CLASSES = 16  # 10 things (contiguous 0-9) + 6 stuff
AUX_LOSSES = {f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(9)}


def _model(config: str, *opts, seed: int = 0) -> MAPS:
    cfg = load_config(CONFIGS / config, list(opts))
    torch.manual_seed(seed)
    return build_model(cfg)


MEMORY_DIM = 64  # synthetic/maps_tiny.yaml: SCENE_MEMORY_DIM = OBJECT_MEMORY_DIM = 64


def _memory(num_objects: int, g: torch.Generator, dim: int = MEMORY_DIM) -> dict:
    return {"scene": torch.randn(5, dim, generator=g),
            "object": torch.randn(num_objects, dim, generator=g),
            "object_slot": torch.randint(0, 5, (num_objects,), generator=g)}


def _inputs(sizes, *, memory_objects=None, with_instances=True, out_size=None, seed=0,
            memory_dim=MEMORY_DIM):
    """Made-up images with 2 segments each (a thing and a stuff region)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, (h, w) in enumerate(sizes):
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "file_name": f"img{i}.jpg"}
        if with_instances:
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            masks[0, h // 4: h // 2, w // 4: w // 2] = True
            masks[1, h // 2:] = True
            inst = Instances((h, w))
            inst.gt_classes = torch.tensor([3, 12])
            inst.gt_masks = masks
            d["instances"] = inst
        if memory_objects is not None:
            d["memory"] = _memory(memory_objects[i], g, memory_dim)
        if out_size is not None:
            d["height"], d["width"] = out_size
        batch.append(d)
    return batch


def test_training_with_memory_returns_finite_losses_and_trains_memory_layers():
    model = _model("maps_tiny.yaml")
    model.train()
    # ragged object memory, one image with no object token at all (all padding: no NaN)
    batch = _inputs([(64, 96), (96, 64)], memory_objects=[0, 7])
    losses = model(batch)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"} | AUX_LOSSES
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    memory_grads = {n: g for n, g in grads.items() if "memory" in n}
    assert memory_grads, "MAPS model has no memory parameters"
    assert any("scene" in n and g.abs().sum() > 0 for n, g in memory_grads.items())
    assert any("object" in n and g.abs().sum() > 0 for n, g in memory_grads.items())


def test_training_without_memory_is_plain_mask2former():
    model = _model("tiny.yaml")
    model.train()
    losses = model(_inputs([(64, 64), (64, 96)]))  # no "memory" needed
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"} | AUX_LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    assert not any("memory" in n for n, _ in model.named_parameters())


def test_missing_memory_is_a_config_error_naming_the_key():
    model = _model("maps_tiny.yaml")
    model.eval()
    with pytest.raises(ConfigError, match=r"MODEL\.MAPS\.ENABLED.*img0\.jpg"):
        with torch.no_grad():
            model(_inputs([(64, 64)], with_instances=False))


def test_inference_outputs_are_resized_and_panoptic_segments_valid():
    model = _model("maps_tiny.yaml",
                   "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
                   "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0")
    model.eval()
    batch = _inputs([(64, 96), (70, 100)], memory_objects=[4, 2], with_instances=False,
                    out_size=(48, 64))
    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for r in results:
        assert set(r) == {"sem_seg", "panoptic_seg", "instances"}
        assert r["sem_seg"].shape == (NUM_CLASSES, 48, 64)
        seg, info = r["panoptic_seg"]
        assert seg.shape == (48, 64) and seg.dtype == torch.int32
        assert info, "with zero thresholds some query must form a segment"
        ids = [s["id"] for s in info]
        assert ids == list(range(1, len(info) + 1))
        assert set(seg.unique().tolist()) - {0} <= set(ids)
        for s in info:
            assert 0 <= s["category_id"] < NUM_CLASSES
            assert s["isthing"] == (s["category_id"] < 10)
        inst = r["instances"]
        assert inst.image_size == (48, 64)
        assert inst.pred_masks.shape[1:] == (48, 64)
        assert len(inst) <= 20  # TEST.DETECTIONS_PER_IMAGE
        assert (inst.pred_classes < 10).all()  # panoptic training: only things are instances
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()


def test_mask2former_part_is_unchanged_by_memory_and_outputs_match_with_memory_off():
    plain = _model("tiny.yaml", seed=7)
    # Table 7 switches: both memories off at inference -> the decoder is Mask2Former's
    maps_model = _model("maps_tiny.yaml", "MODEL.MAPS.TEST.SCENE_MEMORY", "False",
                        "MODEL.MAPS.TEST.OBJECT_MEMORY", "False", seed=7)
    plain_sd, maps_sd = plain.state_dict(), maps_model.state_dict()
    assert set(plain_sd) < set(maps_sd)
    assert all("memory" in k for k in set(maps_sd) - set(plain_sd))
    for k, v in plain_sd.items():
        assert torch.equal(v, maps_sd[k]), k
    plain.eval()
    maps_model.eval()
    batch = _inputs([(64, 96)], memory_objects=[3], with_instances=False)
    with torch.no_grad():
        a, b = plain(batch)[0], maps_model(batch)[0]
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=0, rtol=0)
    torch.testing.assert_close(a["panoptic_seg"][0], b["panoptic_seg"][0], atol=0, rtol=0)
    # and memory on does change the prediction (the test above is not vacuous)
    memory_on = _model("maps_tiny.yaml", seed=7)
    memory_on.eval()
    with torch.no_grad():
        c = memory_on(batch)[0]
    assert not torch.allclose(a["sem_seg"], c["sem_seg"])


def test_prepare_targets_pads_masks_to_the_batch_size():
    inst = Instances((2, 3))
    inst.gt_classes = torch.tensor([5])
    inst.gt_masks = BitMasks(torch.ones(1, 2, 3, dtype=torch.bool))
    images = ImageList(torch.zeros(1, 3, 4, 5), [(2, 3)])
    (target,) = MAPS.prepare_targets([inst], images)
    assert target["labels"].tolist() == [5]
    expected = torch.zeros(1, 4, 5, dtype=torch.bool)
    expected[:, :2, :3] = True
    assert torch.equal(target["masks"], expected)


def test_batch_is_padded_to_size_divisibility():
    model = _model("tiny.yaml")
    images = model.preprocess_image(_inputs([(70, 100), (64, 64)], with_instances=False))
    assert images.tensor.shape[-2:] == (96, 128)
    assert images.image_sizes == [(70, 100), (64, 64)]


def test_fpn_pixel_decoder_is_selectable_by_name():
    model = _model("tiny.yaml", "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "BasePixelDecoder")
    assert type(model.sem_seg_head.pixel_decoder).__name__ == "BasePixelDecoder"
    model.eval()
    with torch.no_grad():
        (r,) = model(_inputs([(64, 64)], with_instances=False))
    assert r["sem_seg"].shape == (NUM_CLASSES, 64, 64)


@pytest.mark.parametrize("opts, message", [
    (("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "Nope"), "PIXEL_DECODER_NAME 'Nope'"),
    (("MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']"), r"IN_FEATURES \['res2'\]"),
    (("MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res5"), "TRANSFORMER_IN_FEATURE 'res5'"),
    (("MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON",
      "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"), "all False"),
])
def test_inconsistent_model_configs_are_config_errors(opts, message):
    with pytest.raises(ConfigError, match=message):
        _model("tiny.yaml", *opts)


def test_semantic_only_inference_postprocesses_after_inference():
    model = _model("tiny.yaml", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
                   "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False")
    assert not model.sem_seg_postprocess_before_inference
    model.eval()
    with torch.no_grad():
        (r,) = model(_inputs([(70, 100)], with_instances=False, out_size=(35, 50)))
    assert set(r) == {"sem_seg"} and r["sem_seg"].shape == (NUM_CLASSES, 35, 50)
    # per pixel, the class scores are sums of probabilities times sigmoids: in [0, Q]
    assert (r["sem_seg"] >= 0).all() and (r["sem_seg"] <= 20).all()
