"""The panoptic training mapper: targets equal the PNG's segments, transforms, memory hook."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

from maps.config import get_maps_cfg
from maps.data import PanopticDatasetMapper, build_train_mapper, read_panoptic_png, register_synthetic
from maps.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def dicts(synthetic_root):
    register_synthetic("mapsyn", str(synthetic_root))
    return DatasetCatalog.get("mapsyn_train")


def _identity_mapper(**kw) -> PanopticDatasetMapper:
    return PanopticDatasetMapper(is_train=True, augmentations=[], image_format="RGB", **kw)


def _cfg(name: str, **input_keys):
    cfg = get_maps_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = name
    for k, v in input_keys.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def test_masks_and_classes_match_the_png(dicts):
    mapper = _identity_mapper()
    for d in dicts:
        out = mapper(d)
        pan = read_panoptic_png(d["pan_seg_file_name"])
        segs = [s for s in d["segments_info"] if not s["iscrowd"]]
        inst = out["instances"]
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
        assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (len(segs), 64, 64)
        assert inst.gt_classes.tolist() == [s["category_id"] for s in segs]
        for mask, s in zip(inst.gt_masks, segs):
            np.testing.assert_array_equal(mask.numpy(), pan == s["id"])
        assert (out["image_id"], out["file_name"], out["height"], out["width"]) == (
            d["image_id"], d["file_name"], 64, 64)
        assert "pan_seg_file_name" not in out and "segments_info" not in out


def test_crowd_segments_are_skipped(dicts):
    d = dict(dicts[0])
    d["segments_info"] = [dict(s) for s in d["segments_info"]]
    d["segments_info"][0]["iscrowd"] = 1
    crowd_id = d["segments_info"][0]["id"]
    inst = _identity_mapper()(d)["instances"]
    # the generator draws crowd groups of its own: every non-crowd segment, and only those
    assert len(inst) == sum(not s["iscrowd"] for s in d["segments_info"]) < len(d["segments_info"])
    pan = read_panoptic_png(d["pan_seg_file_name"])
    assert not any(np.array_equal(m.numpy(), pan == crowd_id) for m in inst.gt_masks)


def test_forced_flip_mirrors_masks_and_image(dicts):
    plain = _identity_mapper()(dicts[1])
    flipped = PanopticDatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0)],
                                    image_format="RGB")(dicts[1])
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
    torch.testing.assert_close(flipped["instances"].gt_masks, plain["instances"].gt_masks.flip(-1))


def test_resize_flip_recipe_from_config(dicts):
    cfg = _cfg("mask_former_panoptic", MIN_SIZE_TRAIN=(32,), MAX_SIZE_TRAIN=1000, RANDOM_FLIP="none")
    out = PanopticDatasetMapper(cfg, is_train=True)(dicts[2])
    assert out["image"].shape == (3, 32, 32)
    masks = out["instances"].gt_masks
    assert masks.shape[1:] == (32, 32)
    assert masks.sum(0).max() <= 1  # segments stay disjoint after nearest resizing
    full = read_panoptic_png(dicts[2]["pan_seg_file_name"])
    for m, s in zip(masks, [s for s in dicts[2]["segments_info"] if not s["iscrowd"]]):
        np.testing.assert_array_equal(m.numpy(), full[::2, ::2] == s["id"])  # exact 2x nearest


def test_lsj_recipe_crops_and_pads_with_void(dicts):
    # image 64 px, target 96 px, scale 0.5: resized to 48, padded to 96 (pad is void, image 128)
    cfg = _cfg("coco_panoptic_lsj", IMAGE_SIZE=96, MIN_SCALE=0.5, MAX_SCALE=0.5, RANDOM_FLIP="none")
    out = PanopticDatasetMapper(cfg, is_train=True)(dicts[0])
    assert out["image"].shape == (3, 96, 96)
    masks = out["instances"].gt_masks
    assert masks.shape[1:] == (96, 96)
    assert not masks[:, 48:, :].any() and not masks[:, :, 48:].any()
    assert (out["image"][:, 48:, :] == 128).all()
    assert masks[:, :48, :48].sum() > 0.9 * 48 * 48  # only void pixels are left uncovered


def test_segments_cropped_away_give_no_empty_target(dicts):
    crop = T.CropTransform(0, 0, 16, 16, 64, 64)  # the top-left 16x16 pixels
    out = PanopticDatasetMapper(is_train=True, augmentations=[crop], image_format="RGB")(dicts[0])
    pan = read_panoptic_png(dicts[0]["pan_seg_file_name"])[:16, :16]
    kept = [s for s in dicts[0]["segments_info"] if not s["iscrowd"] and (pan == s["id"]).any()]
    assert len(kept) < len([s for s in dicts[0]["segments_info"] if not s["iscrowd"]])
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [s["category_id"] for s in kept]
    for m, s in zip(inst.gt_masks, kept):
        np.testing.assert_array_equal(m.numpy(), pan == s["id"])


def test_size_divisibility_pads_image_and_void(dicts):
    cfg = _cfg("mask_former_panoptic", MIN_SIZE_TRAIN=(64,), MAX_SIZE_TRAIN=1000,
               RANDOM_FLIP="none", SIZE_DIVISIBILITY=48, FORMAT="RGB")
    out = PanopticDatasetMapper(cfg, is_train=True)(dicts[0])
    plain = _identity_mapper()(dicts[0])
    assert out["image"].shape == (3, 96, 96)
    torch.testing.assert_close(out["image"][:, :64, :64], plain["image"])
    assert (out["image"][:, 64:, :] == 128).all() and (out["image"][:, :, 64:] == 128).all()
    torch.testing.assert_close(out["instances"].gt_masks[:, :64, :64], plain["instances"].gt_masks)
    assert not out["instances"].gt_masks[:, 64:, :].any()


def test_eval_mode_resizes_and_drops_annotations(dicts):
    cfg = _cfg("mask_former_panoptic", MIN_SIZE_TEST=32, MAX_SIZE_TEST=1000)
    out = PanopticDatasetMapper(cfg, is_train=False)(dicts[0])
    assert out["image"].shape == (3, 32, 32) and "instances" not in out
    assert (out["height"], out["width"]) == (64, 64)  # evaluation resizes back to these


def test_memory_passes_through_unchanged(dicts):
    memory = {"scene": torch.randn(5, 8), "object": torch.randn(7, 8),
              "object_slot": torch.arange(7) % 5}
    d = dict(dicts[0], memory=memory)
    out = _identity_mapper()(d)
    assert out["memory"] is memory and d["memory"] is memory


def test_memory_fn_hook_sees_the_registered_dict(dicts):
    seen = []

    def memory_fn(dd):
        seen.append((dd["image_id"], dd["file_name"], "image" in dd))
        return {"scene": torch.full((2, 4), float(dd["image_id"]))}

    out = _identity_mapper(memory_fn=memory_fn)(dicts[3])
    assert seen == [(dicts[3]["image_id"], dicts[3]["file_name"], False)]
    assert out["memory"]["scene"].shape == (2, 4)
    assert out["memory"]["scene"][0, 0].item() == dicts[3]["image_id"]
    assert "memory" not in dicts[3]  # the registered dict is not modified


def test_unknown_mapper_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"INPUT.DATASET_MAPPER_NAME: unknown mapper 'nope'"):
        PanopticDatasetMapper(_cfg("nope"), is_train=True)


def test_segment_absent_from_png(dicts):
    d = dict(dicts[0])
    d["segments_info"] = [dict(s) for s in d["segments_info"]] + [
        {"id": 12345, "category_id": 0, "iscrowd": 0, "isthing": True}]
    with pytest.raises(DatasetError, match=r"000000000001.png: segment id 12345 listed in the "
                                           r"annotation of image 1 does not occur in the PNG"):
        _identity_mapper()(d)


def test_png_id_missing_from_annotation(dicts):
    d = dict(dicts[0])
    d["segments_info"] = [dict(s) for s in d["segments_info"][1:]]
    missing = dicts[0]["segments_info"][0]["id"]
    with pytest.raises(DatasetError, match=rf"PNG contains segment id {missing} that the annotation"):
        _identity_mapper()(d)


def test_truncated_image(dicts, dataset_copy):
    register_synthetic("trunc", str(dataset_copy))
    d = DatasetCatalog.get("trunc_train")[0]
    data = open(d["file_name"], "rb").read()
    open(d["file_name"], "wb").write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"000000000001.jpg: unreadable or truncated image"):
        _identity_mapper()(d)


def test_truncated_png(dicts, dataset_copy):
    register_synthetic("trunc", str(dataset_copy))
    d = DatasetCatalog.get("trunc_train")[1]
    open(d["pan_seg_file_name"], "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"000000000002.png: unreadable or truncated panoptic PNG"):
        _identity_mapper()(d)


def test_detectron2_train_loader_batches_mapped_samples(dicts):
    from detectron2.data import build_detection_train_loader

    cfg = _cfg("mask_former_panoptic", MIN_SIZE_TRAIN=(48,), MAX_SIZE_TRAIN=1000)
    cfg.DATASETS.TRAIN = ("mapsyn_train",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    loader = build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))
    batch = next(iter(loader))
    assert len(batch) == 2
    for x in batch:
        assert x["image"].shape == (3, 48, 48)
        assert x["instances"].gt_masks.shape[1:] == (48, 48)
        n_classes = len(MetadataCatalog.get("mapsyn_train").stuff_classes)
        assert ((x["instances"].gt_classes >= 0) & (x["instances"].gt_classes < n_classes)).all()


def test_ade20k_style_recipe_crop_and_colour_jitter(dicts):
    cfg = _cfg("mask_former_panoptic", MIN_SIZE_TRAIN=(64,), MAX_SIZE_TRAIN=1000, COLOR_AUG_SSD=True,
               SIZE_DIVISIBILITY=32)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (40, 40)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.6
    mapper = PanopticDatasetMapper(cfg, is_train=True)
    assert mapper._needs_sem_seg
    for d in dicts[:4]:
        out = mapper(d)
        assert out["image"].shape == (3, 64, 64)  # 40x40 crop padded to a multiple of 32
        masks = out["instances"].gt_masks
        assert masks.shape[1:] == (64, 64) and masks.sum(0).max() <= 1
        assert not masks[:, 40:, :].any() and not masks[:, :, 40:].any()
        assert masks.flatten(1).any(1).all()


def test_decoded_cache_gives_the_same_samples_as_reading_from_disk(dicts):
    """A second epoch from the cache equals a mapper reading every file each time (same
    augmentation draws), and changing a returned sample does not change the next epoch."""
    from maps.data.mappers import DecodedCache

    cfg = _cfg("coco_panoptic_lsj", IMAGE_SIZE=64, MIN_SCALE=0.5, MAX_SCALE=1.5)
    cached = PanopticDatasetMapper(cfg, is_train=True)
    plain = PanopticDatasetMapper(cfg, is_train=True, cache_bytes=0)
    assert isinstance(cached.cache, DecodedCache) and not plain.cache.enabled
    for epoch in range(2):
        for i, d in enumerate(dicts):
            np.random.seed(100 * epoch + i)
            a = cached(d)
            np.random.seed(100 * epoch + i)
            b = plain(d)
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)
            assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
            a["image"].zero_()  # must not reach the cache
    assert len(cached.cache) == len(dicts) and len(plain.cache) == 0


def test_decoded_cache_turns_off_when_the_dataset_does_not_fit(dicts):
    mapper = _identity_mapper(cache_bytes=64 * 64 * (3 + 4) + 100)  # one RGB image + int32 ids
    first = mapper(dicts[0])
    assert len(mapper.cache) == 1
    mapper(dicts[1])  # overflows: emptied and off
    assert len(mapper.cache) == 0 and not mapper.cache.enabled
    assert torch.equal(mapper(dicts[0])["image"], first["image"])
