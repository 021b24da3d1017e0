"""The registered metadata is what detectron2's evaluators need: ground truth scores 100."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances

from maps.data import read_panoptic_png, register_synthetic


@pytest.fixture(scope="module")
def val(synthetic_root):
    register_synthetic("evalsyn", str(synthetic_root))
    return DatasetCatalog.get("evalsyn_val")


def _inputs(d):
    return [{"file_name": d["file_name"], "image_id": d["image_id"], "height": 64, "width": 64}]


def test_panoptic_quality_of_ground_truth_is_100(val, tmp_path):
    from detectron2.evaluation import COCOPanopticEvaluator

    ev = COCOPanopticEvaluator("evalsyn_val", output_dir=str(tmp_path))
    ev.reset()
    for d in val:
        pan = torch.from_numpy(read_panoptic_png(d["pan_seg_file_name"]).astype(np.int32))
        segs = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                for s in d["segments_info"]]
        ev.process(_inputs(d), [{"panoptic_seg": (pan, segs)}])
    res = ev.evaluate()["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100.0)
    assert res["PQ_th"] == pytest.approx(100.0) and res["PQ_st"] == pytest.approx(100.0)


def test_miou_of_ground_truth_is_100(val):
    from detectron2.evaluation import SemSegEvaluator
    from PIL import Image

    n = len(MetadataCatalog.get("evalsyn_val").stuff_classes)
    ev = SemSegEvaluator("evalsyn_val", distributed=False)
    ev.reset()
    for d in val:
        sem = torch.from_numpy(np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64))
        scores = torch.nn.functional.one_hot(sem.clamp(max=n - 1), n).permute(2, 0, 1).float()
        ev.process(_inputs(d), [{"sem_seg": scores}])
    assert ev.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_mask_ap_of_ground_truth_is_100(val, tmp_path):
    from detectron2.evaluation import COCOEvaluator

    ev = COCOEvaluator("evalsyn_val", tasks=("segm",), distributed=False, output_dir=str(tmp_path))
    ev.reset()
    for d in val:
        pan = torch.from_numpy(read_panoptic_png(d["pan_seg_file_name"]))
        things = [s for s in d["segments_info"] if s["isthing"] and not s["iscrowd"]]
        inst = Instances((64, 64))
        masks = [pan == s["id"] for s in things]
        inst.pred_masks = torch.stack(masks) if masks else torch.zeros(0, 64, 64, dtype=torch.bool)
        inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        inst.scores = torch.ones(len(things))
        inst.pred_classes = torch.tensor([s["category_id"] for s in things], dtype=torch.int64)
        ev.process(_inputs(d), [{"instances": inst}])
    assert ev.evaluate()["segm"]["AP"] == pytest.approx(100.0)
