"""The evaluators on the project's own synthetic dataset (maps.data), as training uses them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image

from maps.config import get_maps_cfg
from maps.evaluation.evaluators import build_evaluator, flatten_results
from maps.evaluation.pq import read_panoptic_png


def _ground_truth_outputs(record, num_classes):
    """A perfect Mask2Former answer for one dataset record (contiguous ids, as the model)."""
    pan = read_panoptic_png(record["pan_seg_file_name"])
    sem = np.asarray(Image.open(record["sem_seg_file_name"]))
    h, w = pan.shape
    scores = torch.zeros(num_classes, h, w)
    for c in range(num_classes):
        scores[c][torch.from_numpy(sem == c)] = 1.0
    segments = [{k: s[k] for k in ("id", "category_id", "isthing")} for s in record["segments_info"]]
    things = [s for s in record["segments_info"] if s["isthing"] and not s.get("iscrowd", 0)]
    inst = Instances((h, w))
    masks = [torch.from_numpy(pan == s["id"]).float() for s in things]
    inst.pred_masks = torch.stack(masks) if masks else torch.zeros(0, h, w)
    inst.pred_boxes = Boxes(torch.zeros(len(things), 4))
    inst.scores = torch.ones(len(things))
    inst.pred_classes = torch.tensor([s["category_id"] for s in things], dtype=torch.int64)
    return {"panoptic_seg": (torch.from_numpy(pan), segments), "sem_seg": scores, "instances": inst}


def test_synthetic_ground_truth_scores_100(tmp_path):
    from maps.data.datasets import register_synthetic
    from maps.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "synth", num_train=1, num_val=3, size=64, progress=False)
    names = register_synthetic("maps_test_eval_synth", str(root))
    try:
        name = names[-1]
        records = DatasetCatalog.get(name)
        num_classes = len(MetadataCatalog.get(name).stuff_classes)
        evaluator = build_evaluator(get_maps_cfg(), name, str(tmp_path / "eval"))
        evaluator.reset()
        for record in records:
            evaluator.process([record], [_ground_truth_outputs(record, num_classes)])
        flat = flatten_results(evaluator.evaluate())
        assert flat == pytest.approx(dict.fromkeys(["PQ", "PQ_th", "PQ_st", "AP", "mIoU"], 100.0))
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
