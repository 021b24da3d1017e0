"""detectron2 evaluators for the paper's five numbers: PQ, PQ^th, PQ^st, AP_pan^Th, mIoU_pan.

Mask2Former's panoptic model answers each image with three outputs, and each one has its own
evaluator here (as in Mask2Former's ``train_net.py``):

* ``panoptic_seg`` -> :class:`PanopticEvaluator`: PQ / SQ / RQ (All, Things, Stuff) with
  :mod:`maps.evaluation.pq`, computed per image in memory instead of through PNG files;
* ``instances`` -> :class:`InstanceAPEvaluator`: COCO mask AP of the thing classes with
  pycocotools, against ``metadata.json_file``;
* ``sem_seg`` -> :class:`SemanticEvaluator` (detectron2's ``SemSegEvaluator``): mIoU
  against the dataset's ``sem_seg_file_name`` PNGs (contiguous ids, 255 ignored).

Dataset metadata follows Mask2Former's conventions: ``thing_dataset_id_to_contiguous_id``,
``stuff_dataset_id_to_contiguous_id`` (all classes as in Mask2Former, or stuff only as in
detectron2's COCO metadata: both work), ``panoptic_json``,
``panoptic_root``, ``json_file``, ``stuff_classes``, ``ignore_label`` and ``label_divisor``.
Every number is in percent, as detectron2 reports them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm

from maps.errors import ConfigError, DatasetError
from maps.evaluation.pq import (
    PQStat,
    id2rgb,
    normalize_categories,
    pq_image_stats,
    pq_results,
    read_panoptic_png,
)
from maps.io import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "InstanceAPEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "build_evaluator",
    "flatten_results",
    "panoptic_to_percent",
]

PAPER_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
# the evaluator (detectron2 task name) that reports each of them
_TASK_OF = {
    "PQ": "panoptic_seg",
    "PQ_th": "panoptic_seg",
    "PQ_st": "panoptic_seg",
    "AP": "segm",
    "mIoU": "sem_seg",
}
Batch = Sequence[Mapping[str, Any]]


def _metadata_field(dataset_name: str, key: str) -> Any:
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, key):
        raise DatasetError(
            f"dataset {dataset_name!r}: metadata has no {key!r}, which evaluation needs"
        )
    return getattr(meta, key)


def _contiguous_to_dataset(dataset_name: str, key: str) -> Dict[int, int]:
    """Inverse of a ``*_dataset_id_to_contiguous_id`` metadata map."""
    return {v: k for k, v in _metadata_field(dataset_name, key).items()}


def _stem(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0]


# --------------------------------------------------------------------------- panoptic


def panoptic_to_percent(pq_res: Mapping[str, Any]) -> Dict[str, float]:
    """detectron2's ``panoptic_seg`` keys (PQ, SQ, RQ and their _th / _st) from a PQ result dict."""
    out: Dict[str, float] = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            out[metric.upper() + suffix] = 100.0 * pq_res[group][metric]
    return out


class PanopticEvaluator(DatasetEvaluator):
    """PQ of ``panoptic_seg`` outputs, like detectron2's ``COCOPanopticEvaluator``.

    The ground truth is the dataset's ``panoptic_json`` + ``panoptic_root``; predicted
    contiguous category ids go back to dataset ids through the metadata. Statistics are
    accumulated per image (:class:`maps.evaluation.pq.PQStat`) and summed over processes,
    so nothing is written unless ``output_dir`` is given; then the predictions are also
    saved in COCO panoptic format (``panoptic_predictions.json`` + ``panoptic_predictions/``)
    so that ``maps eval pq`` can score them again.
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, *, distributed: bool = True
    ) -> None:
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        meta = MetadataCatalog.get(dataset_name)
        self._thing_c2d = _contiguous_to_dataset(dataset_name, "thing_dataset_id_to_contiguous_id")
        self._stuff_c2d = _contiguous_to_dataset(dataset_name, "stuff_dataset_id_to_contiguous_id")
        self._label_divisor = getattr(meta, "label_divisor", None)
        self._gt_json_path = _metadata_field(dataset_name, "panoptic_json")
        self._gt_root = _metadata_field(dataset_name, "panoptic_root")
        self._load_ground_truth()

    def _load_ground_truth(self) -> None:
        try:
            with open(self._gt_json_path) as f:
                gt = json.load(f)
        except FileNotFoundError:
            raise DatasetError(
                f"dataset {self._dataset_name!r}: panoptic_json not found: {self._gt_json_path}"
            ) from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self._gt_json_path} is not valid JSON: {e}") from None
        for key in ("annotations", "categories"):
            if not isinstance(gt.get(key), list):
                raise DatasetError(f"{self._gt_json_path} has no {key!r} list (COCO panoptic)")
        self._gt_images = gt.get("images", [])
        self._categories = normalize_categories(gt["categories"])
        self._gt_by_id = {ann["image_id"]: ann for ann in gt["annotations"]}
        self._gt_by_stem = {_stem(ann["file_name"]): ann for ann in gt["annotations"]}

    def reset(self) -> None:
        self._stat = PQStat()
        self._predictions: List[Dict[str, Any]] = []

    def _ground_truth_of(self, inp: Mapping[str, Any]) -> Mapping[str, Any]:
        ann = self._gt_by_id.get(inp.get("image_id"))
        if ann is None and "file_name" in inp:
            ann = self._gt_by_stem.get(_stem(inp["file_name"]))
        if ann is None:
            raise DatasetError(
                f"{self._gt_json_path}: no ground truth for image_id {inp.get('image_id')!r} "
                f"({inp.get('file_name')})"
            )
        return ann

    def _to_dataset_ids(
        self, ids: np.ndarray, segments_info: Optional[Sequence[Mapping[str, Any]]]
    ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """Predicted segments with dataset category ids; decodes ``label_divisor`` maps too."""
        if segments_info is None:
            # detectron2's convention: id = category * label_divisor + instance, -1 = void
            if self._label_divisor is None:
                raise DatasetError(
                    f"dataset {self._dataset_name!r}: the model gives panoptic ids without "
                    "segments_info, which needs metadata.label_divisor"
                )
            segments_info = []
            for label in np.unique(ids).tolist():
                if label == -1:
                    continue
                cls = label // self._label_divisor
                segments_info.append(
                    {"id": label + 1, "category_id": cls, "isthing": cls in self._thing_c2d}
                )
            ids = ids + 1
        segments = []
        for seg in segments_info:
            cls = int(seg["category_id"])
            isthing = seg.get("isthing", cls in self._thing_c2d)
            table = self._thing_c2d if isthing else self._stuff_c2d
            if cls not in table:
                raise DatasetError(
                    f"dataset {self._dataset_name!r}: predicted contiguous category {cls} "
                    f"(isthing={seg.get('isthing')}) has no dataset id in the metadata"
                )
            segments.append({"id": int(seg["id"]), "category_id": int(table[cls])})
        return ids, segments

    def process(self, inputs: Batch, outputs: Batch) -> None:
        for inp, out in zip(inputs, outputs):
            panoptic_img, segments_info = out["panoptic_seg"]
            if hasattr(panoptic_img, "cpu"):
                panoptic_img = panoptic_img.cpu().numpy()
            ids, segments = self._to_dataset_ids(np.asarray(panoptic_img, np.int64), segments_info)
            ann = self._ground_truth_of(inp)
            gt_path = os.path.join(self._gt_root, ann["file_name"])
            gt = read_panoptic_png(gt_path)
            image = inp.get("file_name", ann["file_name"])
            where = f"prediction for {image} (ground truth {gt_path})"
            self._stat += pq_image_stats(
                gt, ann["segments_info"], ids, segments, self._categories, where=where
            )
            if self._output_dir:
                self._save_png(ann, ids)
                self._predictions.append(
                    {
                        "image_id": ann["image_id"],
                        "file_name": ann["file_name"],
                        "segments_info": segments,
                    }
                )

    def _save_png(self, ann: Mapping[str, Any], ids: np.ndarray) -> None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(id2rgb(ids)).save(buf, format="PNG")
        path = os.path.join(self._output_dir, "panoptic_predictions", ann["file_name"])
        atomic_write_bytes(path, buf.getvalue())

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        if self._distributed:
            comm.synchronize()
            stats = comm.gather(self._stat)
            predictions = comm.gather(self._predictions)
            if not comm.is_main_process():
                return None
            self._stat = PQStat()
            for stat in stats:
                self._stat += stat
            self._predictions = list(itertools.chain(*predictions))
        pq_res = pq_results(self._stat, self._categories)
        if self._output_dir:
            atomic_write_json(
                os.path.join(self._output_dir, "panoptic_predictions.json"),
                {
                    "images": self._gt_images,
                    "categories": list(self._categories.values()),
                    "annotations": self._predictions,
                },
                indent=None,
            )
        _log_panoptic_table(pq_res)
        return OrderedDict({"panoptic_seg": panoptic_to_percent(pq_res)})


def _log_panoptic_table(pq_res: Mapping[str, Any]) -> None:
    from tabulate import tabulate

    rows = [
        [name] + [100 * pq_res[name][k] for k in ("pq", "sq", "rq")] + [pq_res[name]["n"]]
        for name in ("All", "Things", "Stuff")
    ]
    headers = ["", "PQ", "SQ", "RQ", "#categories"]
    table = tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f")
    logger.info("Panoptic Evaluation Results:\n" + table)


# --------------------------------------------------------------------------- instance AP

_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class InstanceAPEvaluator(DatasetEvaluator):
    """COCO mask AP (pycocotools) of the ``instances`` output on the thing classes.

    A thin wrapper rather than detectron2's ``COCOEvaluator``: Mask2Former's instance masks
    come with placeholder boxes, its contiguous ids cover stuff classes too (so thing ids
    need not be 0..T-1, which ``COCOEvaluator`` asserts), and detectron2's fast COCOeval
    needs its compiled ``_C``. Only images seen by :meth:`process` are scored, so a quick
    evaluation on part of a dataset is not penalised for the images it skipped.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        max_dets_per_image: int = 100,
    ) -> None:
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._max_dets = max_dets_per_image
        self._thing_c2d = _contiguous_to_dataset(dataset_name, "thing_dataset_id_to_contiguous_id")
        self._json_file = _metadata_field(dataset_name, "json_file")
        if not self._json_file:
            raise DatasetError(
                f"dataset {dataset_name!r} has no instances JSON (metadata json_file is empty); "
                "set MODEL.MASK_FORMER.TEST.INSTANCE_ON False to skip instance AP"
            )
        if not os.path.isfile(self._json_file):
            raise DatasetError(f"dataset {dataset_name!r}: json_file not found: {self._json_file}")

    def reset(self) -> None:
        self._predictions: List[Dict[str, Any]] = []
        self._image_ids: List[Any] = []

    def process(self, inputs: Batch, outputs: Batch) -> None:
        for inp, out in zip(inputs, outputs):
            self._image_ids.append(inp["image_id"])
            if "instances" in out:
                self._predictions.extend(self._to_coco(out["instances"].to("cpu"), inp["image_id"]))

    def _to_coco(self, instances: Any, image_id: Any) -> List[Dict[str, Any]]:
        import pycocotools.mask as mask_util

        if len(instances) == 0:
            return []
        masks = instances.pred_masks.numpy() > 0.5
        scores = instances.scores.tolist()
        classes = instances.pred_classes.tolist()
        results = []
        for mask, score, cls in zip(masks, scores, classes):
            if cls not in self._thing_c2d:  # a stuff class: not part of AP^Th
                continue
            rle = mask_util.encode(np.asfortranarray(mask[:, :, None].astype(np.uint8)))[0]
            rle["counts"] = rle["counts"].decode("utf-8")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": self._thing_c2d[cls],
                    "segmentation": rle,
                    "score": float(score),
                }
            )
        return results

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        if self._distributed:
            comm.synchronize()
            predictions = comm.gather(self._predictions)
            image_ids = comm.gather(self._image_ids)
            if not comm.is_main_process():
                return None
            self._predictions = list(itertools.chain(*predictions))
            self._image_ids = list(itertools.chain(*image_ids))
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            atomic_write_json(path, self._predictions, indent=None)
        return OrderedDict({"segm": self._coco_ap()})

    def _coco_ap(self) -> Dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(self._json_file)
        if not self._predictions:
            logger.warning("InstanceAPEvaluator: no thing predictions; AP is 0")
            return {name: 0.0 for name in _AP_NAMES}
        known = set(coco_gt.getImgIds())
        unknown = sorted({p["image_id"] for p in self._predictions} - known, key=str)
        if unknown:
            raise DatasetError(f"{self._json_file}: no image with id {unknown[0]!r}")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(self._predictions))
            coco_eval = COCOeval(coco_gt, coco_dt, "segm")
            coco_eval.params.imgIds = sorted(set(self._image_ids) & known)
            coco_eval.params.maxDets = [1, 10, self._max_dets]
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.info("Instance segmentation AP (segm):\n" + buf.getvalue())
        # pycocotools marks "no ground truth in this area range" with -1
        return {
            name: (100.0 * float(v) if v >= 0 else float("nan"))
            for name, v in zip(_AP_NAMES, coco_eval.stats[:6])
        }


# --------------------------------------------------------------------------- semantic mIoU


class SemanticEvaluator(SemSegEvaluator):
    """detectron2's ``SemSegEvaluator`` (mIoU of ``sem_seg``) for both metadata conventions.

    Mask2Former puts every class in ``stuff_dataset_id_to_contiguous_id`` "in order to use
    the sem_seg evaluator", but detectron2's COCO metadata keeps things out of it; then the
    parent fails on the first thing pixel while encoding its JSON. Here contiguous ids go
    back through the thing and the stuff maps both, and the per-image RLE encoding, which
    only feeds ``sem_seg_predictions.json``, is skipped when there is no ``output_dir``.
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, *, distributed: bool = True
    ) -> None:
        for key in ("stuff_classes", "ignore_label"):
            _metadata_field(dataset_name, key)
        try:
            super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        except KeyError as e:
            raise DatasetError(
                f"dataset {dataset_name!r}: records have no {e.args[0]!r}; set "
                "MODEL.MASK_FORMER.TEST.SEMANTIC_ON False to skip mIoU"
            ) from None
        meta = MetadataCatalog.get(dataset_name)
        c2d: Dict[int, int] = {}
        for key in ("stuff_dataset_id_to_contiguous_id", "thing_dataset_id_to_contiguous_id"):
            c2d.update({v: k for k, v in getattr(meta, key, {}).items()})
        self._contiguous_id_to_dataset_id = c2d or None

    def encode_json_sem_seg(self, sem_seg: np.ndarray, input_file_name: str) -> List[Dict]:
        if not self._output_dir:
            return []
        return super().encode_json_sem_seg(sem_seg, input_file_name)


# --------------------------------------------------------------------------- factory


def build_evaluator(
    cfg: Any, dataset_name: str, output_dir: Optional[str] = None
) -> DatasetEvaluator:
    """The evaluators that ``MODEL.MASK_FORMER.TEST.{SEMANTIC,INSTANCE,PANOPTIC}_ON`` switch on.

    Results come back as one dict: ``panoptic_seg`` (PQ ...), ``segm`` (AP ...),
    ``sem_seg`` (mIoU ...); :func:`flatten_results` picks the paper's five numbers.
    """
    test = cfg.MODEL.MASK_FORMER.TEST
    distributed = comm.get_world_size() > 1
    evaluators: List[DatasetEvaluator] = []
    if test.SEMANTIC_ON:
        evaluators.append(SemanticEvaluator(dataset_name, output_dir, distributed=distributed))
    if test.INSTANCE_ON:
        evaluators.append(InstanceAPEvaluator(dataset_name, output_dir, distributed=distributed))
    if test.PANOPTIC_ON:
        evaluators.append(PanopticEvaluator(dataset_name, output_dir, distributed=distributed))
    if not evaluators:
        raise ConfigError(
            "nothing to evaluate: MODEL.MASK_FORMER.TEST.SEMANTIC_ON, INSTANCE_ON and "
            "PANOPTIC_ON are all False"
        )
    return DatasetEvaluators(evaluators)


def flatten_results(results: Mapping[str, Any]) -> Dict[str, float]:
    """The paper's five numbers ``PQ, PQ_th, PQ_st, AP, mIoU`` (percent; NaN when not evaluated).

    Takes the nested dict of :func:`build_evaluator`'s evaluators or detectron2's flattened
    form (``"panoptic_seg/PQ"``, as in ``metrics.json``).
    """
    out: Dict[str, float] = {}
    for name in PAPER_METRICS:
        task = _TASK_OF[name]
        value = results.get(task, {}).get(name) if isinstance(results.get(task), Mapping) else None
        if value is None:
            value = results.get(f"{task}/{name}")
        out[name] = float(value) if value is not None else math.nan
    return out
