"""Training-time evaluators on a hand-made two-image dataset in COCO panoptic layout.

Categories, in contiguous order (Mask2Former: stuff_dataset_id_to_contiguous_id covers all
classes): person (1, thing) -> 0, sky (92, stuff) -> 1, car (3, thing) -> 2, road (100,
stuff) -> 3. Thing contiguous ids {0, 2} are not 0..T-1 on purpose.

Image 0, 16 x 20: sky rows 0-7, road rows 8-15, car rows 2-5 x cols 12-17 (24 px) on the
sky, person rows 9-14 x cols 2-7 (36 px) on the road, void row 15 x cols 15-19.
Image 1, 16 x 20: sky rows 0-9, road rows 10-15, person rows 4-11 x cols 3-8 (48 px), a
person crowd rows 11-14 x cols 12-18 (28 px), void row 0 x cols 0-3.
"""
from __future__ import annotations

import copy
import json
import math
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from maps.config import get_maps_cfg
from maps.errors import ConfigError, DatasetError
from maps.evaluation.evaluators import (
    InstanceAPEvaluator,
    PanopticEvaluator,
    build_evaluator,
    flatten_results,
)
from maps.evaluation.pq import pq_compute

from .panoptic_fixtures import write_png

H, W = 16, 20
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 92, "name": "sky", "isthing": 0},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 100, "name": "road", "isthing": 0},
]
CONTIGUOUS = {1: 0, 92: 1, 3: 2, 100: 3}
THING_CONTIGUOUS = {1: 0, 3: 2}
PERSON, SKY, CAR, ROAD = 0, 1, 2, 3


def _scenes():
    """(ids, segments: id -> (dataset category, iscrowd)) for both images."""
    a = np.zeros((H, W), dtype=np.int64)
    a[0:8] = 1001
    a[8:16] = 1002
    a[2:6, 12:18] = 70002
    a[9:15, 2:8] = 70001
    a[15, 15:20] = 0
    seg_a = {1001: (92, 0), 1002: (100, 0), 70001: (1, 0), 70002: (3, 0)}
    b = np.zeros((H, W), dtype=np.int64)
    b[0:10] = 2001
    b[10:16] = 2002
    b[4:12, 3:9] = 80001
    b[11:15, 12:19] = 80002
    b[0, 0:4] = 0
    seg_b = {2001: (92, 0), 2002: (100, 0), 80001: (1, 0), 80002: (1, 1)}
    return [(a, seg_a), (b, seg_b)]


@pytest.fixture(scope="module", params=["all_classes", "stuff_only"])
def dataset(request, tmp_path_factory):
    """Writes images, panoptic PNG + JSON, semantic PNGs and an instances JSON; registers them.

    Two metadata conventions: Mask2Former's stuff map holds all classes, detectron2's COCO
    metadata (and maps.data) holds stuff classes only.
    """
    root = tmp_path_factory.mktemp("evalds")
    (root / "semantic").mkdir()
    images, pan_anns, inst_anns, dicts = [], [], [], []
    for image_id, (ids, segs) in enumerate(_scenes()):
        stem = f"{image_id:012d}"
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / f"{stem}.jpg")
        write_png(root / "panoptic" / f"{stem}.png", ids)
        sem = np.full((H, W), 255, dtype=np.uint8)
        segments_info = []
        for seg_id, (cat, crowd) in segs.items():
            mask = ids == seg_id
            sem[mask] = CONTIGUOUS[cat]
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
            area = int(mask.sum())
            segments_info.append(
                {"id": seg_id, "category_id": cat, "iscrowd": crowd, "area": area, "bbox": bbox}
            )
            if cat in THING_CONTIGUOUS:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                inst_anns.append({"id": len(inst_anns) + 1, "image_id": image_id, "category_id": cat,
                                  "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": crowd})
        Image.fromarray(sem).save(root / "semantic" / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W})
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png",
                         "segments_info": segments_info})
        dicts.append({
            "file_name": str(root / f"{stem}.jpg"), "image_id": image_id, "height": H, "width": W,
            "pan_seg_file_name": str(root / "panoptic" / f"{stem}.png"),
            "sem_seg_file_name": str(root / "semantic" / f"{stem}.png"),
            # detectron2's loader turns dataset ids into contiguous ones
            "segments_info": [
                dict(s, category_id=CONTIGUOUS[s["category_id"]],
                     isthing=s["category_id"] in THING_CONTIGUOUS)
                for s in segments_info
            ],
        })
    panoptic = {"images": images, "annotations": pan_anns, "categories": CATEGORIES}
    (root / "panoptic.json").write_text(json.dumps(panoptic))
    (root / "instances.json").write_text(json.dumps({
        "images": images, "annotations": inst_anns,
        "categories": [c for c in CATEGORIES if c["isthing"]]}))
    name = f"maps_test_eval_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(
        thing_classes=["person", "car"],
        stuff_classes=["person", "sky", "car", "road"],
        thing_dataset_id_to_contiguous_id=THING_CONTIGUOUS,
        stuff_dataset_id_to_contiguous_id=(
            CONTIGUOUS if request.param == "all_classes"
            else {k: v for k, v in CONTIGUOUS.items() if k not in THING_CONTIGUOUS}
        ),
        panoptic_json=str(root / "panoptic.json"),
        panoptic_root=str(root / "panoptic"),
        sem_seg_root=str(root / "semantic"),
        json_file=str(root / "instances.json"),
        ignore_label=255,
        label_divisor=1000,
        evaluator_type="coco_panoptic_seg",
    )
    yield name, dicts, root
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _fake_outputs(relabel_person_in_image_1: bool = False, drop_person_in_image_1: bool = False):
    """What a Mask2Former panoptic model returns, built from the ground truth.

    ``relabel_person_in_image_1`` predicts person 80001 as a car (panoptic and semantic);
    ``drop_person_in_image_1`` leaves it out of the instance output.
    """
    outputs = []
    for image_id, (ids, segs) in enumerate(_scenes()):
        pan = np.zeros((H, W), dtype=np.int32)
        segments_info = []
        sem = torch.zeros(len(CONTIGUOUS), H, W)
        masks, classes = [], []
        for k, (seg_id, (cat, crowd)) in enumerate(segs.items(), start=1):
            mask = ids == seg_id
            cls = CONTIGUOUS[cat]
            if relabel_person_in_image_1 and seg_id == 80001:
                cls = CAR
            pan[mask] = k
            isthing = cls in THING_CONTIGUOUS.values()
            segments_info.append({"id": k, "category_id": cls, "isthing": isthing})
            sem[cls][torch.from_numpy(mask)] = 1.0
            dropped = drop_person_in_image_1 and seg_id == 80001
            if cat in THING_CONTIGUOUS and not crowd and not dropped:
                masks.append(torch.from_numpy(mask).float())
                classes.append(CONTIGUOUS[cat])
        inst = Instances((H, W))
        inst.pred_masks = torch.stack(masks) if masks else torch.zeros(0, H, W)
        inst.pred_boxes = Boxes(torch.zeros(len(masks), 4))  # Mask2Former's placeholder boxes
        inst.scores = torch.linspace(0.9, 0.8, len(masks))
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        outputs.append(
            {"panoptic_seg": (torch.from_numpy(pan), segments_info), "sem_seg": sem, "instances": inst}
        )
    return outputs


def _evaluate(evaluator, dicts, outputs):
    evaluator.reset()
    for inp, out in zip(dicts, outputs):
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_ground_truth_as_prediction_scores_100(dataset):
    name, dicts, _ = dataset
    results = _evaluate(build_evaluator(get_maps_cfg(), name, None), dicts, _fake_outputs())
    flat = flatten_results(results)
    assert flat == pytest.approx(dict.fromkeys(["PQ", "PQ_th", "PQ_st", "AP", "mIoU"], 100.0))
    assert results["panoptic_seg"]["SQ_th"] == pytest.approx(100.0)


def test_known_perturbation_hand_computed(dataset, tmp_path):
    """Person 80001 (image 1) predicted as car; dropped from the instance output.

    PQ: person tp 1 (image 0), fn 1 -> 1/1.5 = 2/3; car tp 1, fp 1 -> 2/3; sky, road 1.
        PQ = (2/3 + 2/3 + 1 + 1) / 4 = 5/6; PQ_th = 2/3; PQ_st = 1; SQ = 1 everywhere.
    mIoU: person GT 36 + 48 + 28 (crowd) = 112 px, predicted 64, IoU 64/112 = 4/7;
        car GT 24 px, predicted 24 + 48 = 72, IoU 1/3; sky, road 1 -> (4/7 + 1/3 + 2)/4 = 61/84.
    AP: person recall stops at 1/2 with precision 1 -> 51 of 101 recall points;
        car 1 -> (51/101 + 1) / 2, the same at every IoU threshold (masks are exact).
    """
    name, dicts, _ = dataset
    outputs = _fake_outputs(relabel_person_in_image_1=True, drop_person_in_image_1=True)
    results = _evaluate(build_evaluator(get_maps_cfg(), name, str(tmp_path)), dicts, outputs)
    for saved in ("panoptic_predictions.json", "coco_instances_results.json", "sem_seg_predictions.json"):
        assert (tmp_path / saved).is_file(), saved
    assert flatten_results(results) == pytest.approx({
        "PQ": 100 * 5 / 6, "PQ_th": 100 * 2 / 3, "PQ_st": 100.0,
        "AP": 100 * (51 / 101 + 1) / 2, "mIoU": 100 * 61 / 84,
    })
    pan = results["panoptic_seg"]
    assert pan["SQ"] == pytest.approx(100.0) and pan["RQ_th"] == pytest.approx(100 * 2 / 3)
    assert results["segm"]["AP50"] == pytest.approx(100 * (51 / 101 + 1) / 2)
    assert math.isnan(results["segm"]["APl"])  # no large objects in the ground truth


def test_panoptic_agrees_with_detectron2_and_panopticapi(dataset, tmp_path):
    """Same outputs through detectron2's COCOPanopticEvaluator (PNG files + panopticapi)."""
    from detectron2.evaluation import COCOPanopticEvaluator

    name, dicts, _ = dataset
    outputs = _fake_outputs(relabel_person_in_image_1=True)
    ours = _evaluate(PanopticEvaluator(name), dicts, outputs)["panoptic_seg"]
    reference = COCOPanopticEvaluator(name, str(tmp_path))
    theirs = _evaluate(reference, dicts, copy.deepcopy(outputs))["panoptic_seg"]
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_saved_predictions_score_the_same_with_maps_eval_pq(dataset, tmp_path):
    name, dicts, root = dataset
    outputs = _fake_outputs(relabel_person_in_image_1=True)
    res = _evaluate(PanopticEvaluator(name, str(tmp_path)), dicts, outputs)["panoptic_seg"]
    again = pq_compute(root / "panoptic.json", root / "panoptic",
                       tmp_path / "panoptic_predictions.json", tmp_path / "panoptic_predictions")
    assert 100 * again["All"]["pq"] == pytest.approx(res["PQ"]) == pytest.approx(100 * 5 / 6)
    assert 100 * again["Things"]["pq"] == pytest.approx(res["PQ_th"])


def test_label_divisor_outputs_without_segments_info(dataset):
    """detectron2's other convention: id = contiguous class * label_divisor + instance, -1 void."""
    name, dicts, _ = dataset
    outputs = []
    for out in _fake_outputs():
        pan, segments_info = out["panoptic_seg"]
        encoded = torch.full_like(pan, -1)
        for seg in segments_info:
            encoded[pan == seg["id"]] = seg["category_id"] * 1000 + seg["id"]
        outputs.append({"panoptic_seg": (encoded, None)})
    results = _evaluate(PanopticEvaluator(name), dicts, outputs)
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)


def test_evaluator_flags_and_flatten_nan(dataset):
    name, dicts, _ = dataset
    cfg = get_maps_cfg()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    results = _evaluate(build_evaluator(cfg, name, None), dicts, _fake_outputs())
    assert set(results) == {"panoptic_seg"}
    flat = flatten_results(results)
    assert flat["PQ"] == pytest.approx(100.0) and math.isnan(flat["AP"]) and math.isnan(flat["mIoU"])
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    with pytest.raises(ConfigError, match="PANOPTIC_ON"):
        build_evaluator(cfg, name, None)


def test_flatten_reads_detectron2_flattened_keys():
    flat = flatten_results({
        "panoptic_seg/PQ": 40.0, "panoptic_seg/PQ_th": 45.0, "panoptic_seg/PQ_st": 30.0,
        "segm/AP": 25.5, "sem_seg/mIoU": 47.0, "segm/AP50": 60.0,
    })
    assert flat == {"PQ": 40.0, "PQ_th": 45.0, "PQ_st": 30.0, "AP": 25.5, "mIoU": 47.0}


def test_missing_metadata_is_named(dataset):
    name = f"maps_test_eval_bare_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id=THING_CONTIGUOUS)
    try:
        with pytest.raises(DatasetError, match=f"{name}.*'json_file'"):
            InstanceAPEvaluator(name)
        with pytest.raises(DatasetError, match="'stuff_dataset_id_to_contiguous_id'"):
            PanopticEvaluator(name)
    finally:
        MetadataCatalog.remove(name)


def test_unknown_image_is_named(dataset):
    name, dicts, _ = dataset
    evaluator = PanopticEvaluator(name)
    evaluator.reset()
    bad = dict(dicts[0], image_id=99, file_name="/x/unknown.jpg")
    with pytest.raises(DatasetError, match=r"panoptic\.json: no ground truth for image_id 99"):
        evaluator.process([bad], _fake_outputs()[:1])


def test_runs_under_detectron2_inference_on_dataset(dataset):
    """The path the trainer's test() takes: inference_on_dataset(model, loader, evaluator)."""
    from detectron2.evaluation import inference_on_dataset

    name, dicts, _ = dataset
    by_id = {d["image_id"]: o for d, o in zip(dicts, _fake_outputs(relabel_person_in_image_1=True))}

    class GroundTruthModel(torch.nn.Module):
        def forward(self, batch):
            return [by_id[x["image_id"]] for x in batch]

    loader = [[copy.deepcopy(d)] for d in dicts]
    evaluator = build_evaluator(get_maps_cfg(), name, None)
    results = inference_on_dataset(GroundTruthModel(), loader, evaluator)
    flat = flatten_results(results)
    assert flat["PQ"] == pytest.approx(100 * 5 / 6) and flat["mIoU"] == pytest.approx(100 * 61 / 84)
    assert flat["AP"] == pytest.approx(100.0)  # the instance output is untouched here


def test_dataset_without_instances_or_semantic_files_is_named(dataset):
    name, dicts, _ = dataset
    bare = f"maps_test_eval_nosem_{uuid.uuid4().hex[:8]}"
    meta = MetadataCatalog.get(name).as_dict()
    meta.pop("name")
    DatasetCatalog.register(bare, lambda: [{k: v for k, v in d.items() if k != "sem_seg_file_name"} for d in dicts])
    MetadataCatalog.get(bare).set(**dict(meta, json_file=None))
    try:
        with pytest.raises(DatasetError, match="no instances JSON.*INSTANCE_ON False"):
            InstanceAPEvaluator(bare)
        with pytest.raises(DatasetError, match="no 'sem_seg_file_name'.*SEMANTIC_ON False"):
            build_evaluator(get_maps_cfg(), bare, None)
    finally:
        DatasetCatalog.remove(bare)
        MetadataCatalog.remove(bare)
