"""Dataset registration: names, Mask2Former metadata, and errors that name the broken file."""
from __future__ import annotations

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import maps.data
from maps.data import datasets_root, register_cityscapes_panoptic, register_synthetic
from maps.data.synthetic import SCENES, SYNTHETIC_CATEGORIES
from maps.errors import DatasetError

from .conftest import TINY


def test_importing_maps_data_registers_every_dataset():
    names = set(DatasetCatalog.list())
    assert {"synthetic_train", "synthetic_val",
            "coco_2017_train_panoptic_with_sem_seg", "coco_2017_val_panoptic_with_sem_seg",
            "ade20k_panoptic_train", "ade20k_panoptic_val",
            "cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val",
            "coco_2017_train_panoptic"} <= names  # the last: detectron2's own, kept


def test_real_benchmark_metadata():
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(coco.stuff_classes) == 133 and len(coco.thing_classes) == 80
    assert coco.thing_dataset_id_to_contiguous_id[1] == 0        # person
    assert coco.stuff_dataset_id_to_contiguous_id[200] == 132    # wall-other-merged, last
    assert coco.stuff_dataset_id_to_contiguous_id[1] == 0        # all ids, as in Mask2Former
    assert coco.sem_seg_root.endswith(os.path.join("coco", "panoptic_semseg_val2017"))
    assert coco.json_file.endswith(os.path.join("annotations", "instances_val2017.json"))
    ade = MetadataCatalog.get("ade20k_panoptic_train")
    assert len(ade.stuff_classes) == 150 and len(ade.thing_classes) == 100
    assert ade.evaluator_type == "ade20k_panoptic_seg"
    assert ade.thing_dataset_id_to_contiguous_id[7] == 7          # bed
    assert len(ade.stuff_dataset_id_to_contiguous_id) == 150      # Mask2Former: things too
    assert ade.panoptic_root.endswith(os.path.join("ADEChallengeData2016", "ade20k_panoptic_train"))
    city = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert city.evaluator_type == "cityscapes_panoptic_seg" and len(city.stuff_classes) == 19


def test_datasets_root_follows_detectron2(monkeypatch, tmp_path):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert datasets_root() == "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert datasets_root() == str(tmp_path)
    try:
        maps.data.register_all()
        assert MetadataCatalog.get("synthetic_train").panoptic_json == str(tmp_path / "synthetic" / "panoptic_train.json")
    finally:
        monkeypatch.delenv("DETECTRON2_DATASETS")
        maps.data.register_all()


def test_register_synthetic_metadata_and_dicts(synthetic_root):
    names = register_synthetic("tsyn", str(synthetic_root))
    assert names == ["tsyn_train", "tsyn_val"]
    meta = MetadataCatalog.get("tsyn_val")
    assert meta.stuff_classes == [c["name"] for c in SYNTHETIC_CATEGORIES]
    assert meta.thing_classes == [c["name"] for c in SYNTHETIC_CATEGORIES if c["isthing"]]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 7: 5, 8: 6, 9: 7, 10: 8, 11: 9}
    assert meta.stuff_dataset_id_to_contiguous_id == {
        **meta.thing_dataset_id_to_contiguous_id, 21: 10, 22: 11, 23: 12, 24: 13, 25: 14, 26: 15}
    assert (meta.ignore_label, meta.label_divisor, meta.evaluator_type) == (255, 1000, "coco_panoptic_seg")
    assert meta.panoptic_root == str(synthetic_root / "panoptic_val")
    assert meta.image_root == str(synthetic_root / "val")
    assert meta.sem_seg_root == str(synthetic_root / "panoptic_semseg_val")
    assert meta.json_file == str(synthetic_root / "instances_val.json")
    assert meta.scene_classes == list(SCENES)
    assert len(meta.thing_colors) == 10 and len(meta.stuff_colors) == 16

    dicts = DatasetCatalog.get("tsyn_val")
    raw = json.loads((synthetic_root / "panoptic_val.json").read_text())
    assert len(dicts) == TINY["num_val"]
    d, ann, img = dicts[0], raw["annotations"][0], raw["images"][0]
    assert d["image_id"] == ann["image_id"] and d["scene"] == img["scene"]
    assert (d["height"], d["width"]) == (64, 64)
    assert d["sem_seg_file_name"] == str(synthetic_root / "panoptic_semseg_val" / ann["file_name"])
    for seg, raw_seg in zip(d["segments_info"], ann["segments_info"]):
        is_thing = raw_seg["category_id"] < 20
        assert seg["isthing"] is is_thing
        expected = (meta.thing_dataset_id_to_contiguous_id if is_thing
                    else meta.stuff_dataset_id_to_contiguous_id)[raw_seg["category_id"]]
        assert seg["category_id"] == expected and seg["id"] == raw_seg["id"]


def test_register_again_points_the_names_elsewhere(synthetic_root, dataset_copy):
    register_synthetic("tsyn2", str(synthetic_root))
    register_synthetic("tsyn2", str(dataset_copy))
    assert MetadataCatalog.get("tsyn2_train").image_root == str(dataset_copy / "train")
    assert DatasetCatalog.get("tsyn2_train")[0]["file_name"].startswith(str(dataset_copy))


def _first_ann(data):
    return data["annotations"][0]


BREAKAGES = {
    "missing json": (lambda root, edit: (root / "panoptic_train.json").unlink(),
                     r"panoptic_train.json: panoptic annotation JSON not found; create the dataset "
                     r"with `maps data synth --out "),
    "truncated json": (lambda root, edit: (root / "panoptic_train.json").write_text('{"annotations": ['),
                       r"panoptic_train.json: panoptic annotation JSON is not readable JSON"),
    "no annotations": (lambda root, edit: edit(root / "panoptic_train.json", lambda d: d.pop("annotations")),
                       r"panoptic_train.json: missing 'annotations' list"),
    "annotation without segments_info": (
        lambda root, edit: edit(root / "panoptic_train.json", lambda d: _first_ann(d).pop("segments_info")),
        r"panoptic_train.json: annotation #0 lacks required field\(s\) segments_info"),
    "segment without category": (
        lambda root, edit: edit(root / "panoptic_train.json",
                                lambda d: _first_ann(d)["segments_info"][0].pop("category_id")),
        r"panoptic_train.json: a segment of image 1 \(000000000001.png\) lacks field\(s\) category_id"),
    "unknown category": (
        lambda root, edit: edit(root / "panoptic_train.json",
                                lambda d: _first_ann(d)["segments_info"][0].update(category_id=99)),
        r"panoptic_train.json: segment \d+ of image 1 \(000000000001.png\) has unknown category_id 99"),
    "annotation png missing": (
        lambda root, edit: (root / "panoptic_train" / "000000000002.png").unlink(),
        r"panoptic_train/000000000002.png: panoptic PNG of image 2 \(listed in .*panoptic_train.json\) "
        r"does not exist"),
    "png without annotation": (
        lambda root, edit: (root / "panoptic_train" / "000000000999.png").write_bytes(
            (root / "panoptic_train" / "000000000001.png").read_bytes()),
        r"panoptic_train/000000000999.png: panoptic PNG has no annotation in .*panoptic_train.json"),
    "image missing": (
        lambda root, edit: (root / "train" / "000000000003.jpg").unlink(),
        r"train/000000000003.jpg: image 3 \(listed in .*panoptic_train.json\) does not exist"),
    "semantic png missing": (
        lambda root, edit: (root / "panoptic_semseg_train" / "000000000001.png").unlink(),
        r"panoptic_semseg_train/000000000001.png: semantic PNG of image 1 does not exist"),
    "panoptic folder missing": (
        lambda root, edit: [p.unlink() for p in (root / "panoptic_train").iterdir()]
        and (root / "panoptic_train").rmdir(),
        r"panoptic_train: panoptic PNG directory not found"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_dataset_fails_when_loaded_naming_the_file(breakage, dataset_copy, edit_json):
    breaker, message = BREAKAGES[breakage]
    breaker(dataset_copy, edit_json)
    register_synthetic("broken", str(dataset_copy))
    with pytest.raises(DatasetError, match=message) as info:
        DatasetCatalog.get("broken_train")
    assert str(dataset_copy) in str(info.value)


def test_cityscapes_guard_names_the_missing_path(tmp_path):
    try:
        register_cityscapes_panoptic(str(tmp_path))
        with pytest.raises(DatasetError, match=r"cityscapes/leftImg8bit/val: Cityscapes image directory"):
            DatasetCatalog.get("cityscapes_fine_panoptic_val")
        (tmp_path / "cityscapes" / "leftImg8bit" / "val").mkdir(parents=True)
        (tmp_path / "cityscapes" / "gtFine" / "cityscapes_panoptic_val").mkdir(parents=True)
        with pytest.raises(DatasetError, match=r"cityscapes_panoptic_val.json: Cityscapes panoptic JSON not found"):
            DatasetCatalog.get("cityscapes_fine_panoptic_val")
        assert MetadataCatalog.get("cityscapes_fine_panoptic_val").thing_dataset_id_to_contiguous_id
    finally:
        register_cityscapes_panoptic(datasets_root())
