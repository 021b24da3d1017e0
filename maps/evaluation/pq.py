"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019), as COCO's panopticapi computes it.

The paper reports PQ, PQ^th and PQ^st with COCO's reference script (``panopticapi``'s
``pq_compute``). This module computes the same numbers without its per-pixel Python loops
and without writing prediction PNGs during training: one image is a pair of segment-id maps
plus their ``segments_info``; a confusion matrix of (ground-truth id, predicted id) pixel
counts is built with ``np.unique`` + ``np.bincount``, and the matching is done on that
matrix.

Reference semantics kept on purpose (the tests check them against panopticapi and hotcoco):

* void is ground-truth id 0; the void pixels of a predicted segment are removed from every
  union it takes part in: ``union = pred_area + gt_area - intersection - void_in_pred``
  (ground-truth ids missing from ``segments_info`` are not void: they only count in unions);
* a ground-truth segment's area is the ``area`` of its ``segments_info`` entry when there is
  one (the reference reads it from the JSON), a predicted segment's area is its pixel count;
* a pair is a match when it has the same category, the ground truth is not crowd, and
  IoU > 0.5 (which makes matches unique);
* an unmatched prediction is not a false positive when more than half of it lies in void or
  in the crowd region of its own category (the last crowd segment of that category in
  ``segments_info``, as in the reference);
* a class enters the averages only when it has tp + fp + fn > 0; ``n`` counts those classes.

Deviations: bad input raises :class:`maps.errors.DatasetError` naming the file and value at
fault (the reference raises ``KeyError``/``Exception``); a group with no counted class
(e.g. "Stuff" on a things-only dataset) reports 0.0 with ``n = 0`` instead of dividing by
zero; ground-truth segments whose category is not in ``categories`` and duplicated segment
ids are errors instead of being silently dropped.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from maps.errors import DatasetError

OFFSET = 256 * 256 * 256
VOID = 0

PathLike = Union[str, os.PathLike]
Segment = Mapping[str, Any]
Categories = Dict[int, Mapping[str, Any]]
CategoriesLike = Union[Sequence[Mapping[str, Any]], Mapping[int, Mapping[str, Any]]]

__all__ = [
    "OFFSET",
    "VOID",
    "PQStat",
    "PQStatCat",
    "id2rgb",
    "normalize_categories",
    "pq_compute",
    "pq_image_stats",
    "pq_results",
    "read_panoptic_png",
    "rgb2id",
]


# --------------------------------------------------------------------------- id maps


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic colour (R + 256 G + 256^2 B) to segment id; 2-D input is already ids."""
    color = np.asarray(color)
    if color.ndim == 2:
        return color.astype(np.int64)
    color = color[..., :3].astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) to the uint8 RGB image (H, W, 3) of the COCO panoptic format."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must be in [0, {OFFSET}), got [{ids.min()}, {ids.max()}]")
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = (ids // 256) % 256
    rgb[..., 2] = ids // (256 * 256)
    return rgb


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Read a COCO panoptic PNG as an (H, W) int64 segment-id map; a missing file is named."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except FileNotFoundError:
        raise DatasetError(f"panoptic PNG not found: {path}") from None
    except OSError as e:
        raise DatasetError(f"cannot read panoptic PNG {path}: {e}") from None
    if array.ndim not in (2, 3):
        raise DatasetError(f"panoptic PNG {path} has shape {array.shape}, expected (H, W, 3)")
    return rgb2id(array)


# --------------------------------------------------------------------------- statistics


@dataclass
class PQStatCat:
    """Sums over images for one category: IoU of the matches and the tp / fp / fn counts."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category :class:`PQStatCat`; summed with ``+=`` over images and processes (picklable)."""

    def __init__(self) -> None:
        self.per_category: Dict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.per_category[category_id]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for category_id, stat in other.per_category.items():
            self.per_category[category_id] += stat
        return self

    def __repr__(self) -> str:
        return f"PQStat({dict(self.per_category)!r})"

    def per_class(self, categories: Categories) -> Dict[int, Dict[str, float]]:
        """pq, sq, rq, tp, fp, fn of every category (zeros for a class never seen)."""
        out = {}
        for category_id in categories:
            s = self.per_category.get(category_id, PQStatCat())
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            out[category_id] = {
                "pq": s.iou / denom if denom else 0.0,
                "sq": s.iou / s.tp if s.tp else 0.0,
                "rq": s.tp / denom if denom else 0.0,
                "tp": s.tp,
                "fp": s.fp,
                "fn": s.fn,
            }
        return out

    def pq_average(self, categories: Categories, isthing: Optional[bool]) -> Dict[str, float]:
        """Mean pq / sq / rq over the counted classes (tp + fp + fn > 0) of a group.

        ``isthing`` None is "All", True "Things", False "Stuff" (categories' ``isthing`` flag).
        """
        pq = sq = rq = 0.0
        n = 0
        for category_id, info in categories.items():
            if isthing is not None and (info.get("isthing", 0) == 1) != isthing:
                continue
            s = self.per_category.get(category_id)
            if s is None or s.tp + s.fp + s.fn == 0:
                continue
            n += 1
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pq += s.iou / denom
            sq += s.iou / s.tp if s.tp != 0 else 0.0
            rq += s.tp / denom
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


def pq_results(stat: PQStat, categories: Categories) -> Dict[str, Any]:
    """The result dict of :func:`pq_compute` from accumulated statistics (values in [0, 1])."""
    return {
        "All": stat.pq_average(categories, None),
        "Things": stat.pq_average(categories, True),
        "Stuff": stat.pq_average(categories, False),
        "per_class": stat.per_class(categories),
    }


# --------------------------------------------------------------------------- one image


def _index_segments(segments: Iterable[Segment], where: str, kind: str) -> Dict[int, Segment]:
    out: Dict[int, Segment] = {}
    for seg in segments:
        try:
            seg_id = int(seg["id"])
            int(seg["category_id"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"{where}: {kind} segments_info entry {seg!r} needs integer 'id' and 'category_id'"
            ) from None
        if seg_id in out:
            raise DatasetError(
                f"{where}: {kind} segment id {seg_id} appears twice in segments_info"
            )
        out[seg_id] = seg
    return out


def _confusion(
    gt_ids: np.ndarray, pred_ids: np.ndarray, where: str
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted ground-truth ids, sorted predicted ids, and their pixel-count matrix.

    One sort of the combined id ``gt * OFFSET + pred`` (as the reference does), after
    collapsing runs of equal neighbouring pixels, which segment maps are made of.
    """
    for ids, kind in ((gt_ids, "ground-truth"), (pred_ids, "predicted")):
        if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
            raise DatasetError(
                f"{where}: {kind} segment ids must be in [0, {OFFSET}), "
                f"got [{ids.min()}, {ids.max()}]"
            )
    combined = gt_ids.reshape(-1).astype(np.int64) * OFFSET + pred_ids.reshape(-1).astype(np.int64)
    if combined.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
    starts = np.concatenate(([0], np.flatnonzero(combined[1:] != combined[:-1]) + 1))
    run_lengths = np.diff(np.append(starts, combined.size))
    pairs, inverse = np.unique(combined[starts], return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=run_lengths, minlength=len(pairs))
    counts = counts.astype(np.int64)
    pair_gt, pair_pred = pairs // OFFSET, pairs % OFFSET
    gt_labels, pred_labels = np.unique(pair_gt), np.unique(pair_pred)
    conf = np.zeros((len(gt_labels), len(pred_labels)), dtype=np.int64)
    conf[np.searchsorted(gt_labels, pair_gt), np.searchsorted(pred_labels, pair_pred)] = counts
    return gt_labels, pred_labels, conf


def _check_segments(
    gt_segs: Mapping[int, Segment],
    pred_segs: Mapping[int, Segment],
    pred_labels: np.ndarray,
    categories: Categories,
    where: str,
) -> None:
    """The reference's sanity checks: PNG ids and segments_info agree, categories are known."""
    pred_in_png = set(pred_labels.tolist())
    for label in sorted(pred_in_png):
        if label not in pred_segs and label != VOID:
            raise DatasetError(
                f"{where}: segment id {label} is in the PNG but not in its segments_info"
            )
    missing = [i for i in pred_segs if i not in pred_in_png]
    if missing:
        raise DatasetError(f"{where}: segments_info ids {missing} are not in the PNG")
    for kind, segs in (("predicted", pred_segs), ("ground-truth", gt_segs)):
        for seg_id, seg in segs.items():
            if int(seg["category_id"]) not in categories:
                raise DatasetError(
                    f"{where}: {kind} segment {seg_id} has unknown category_id "
                    f"{seg['category_id']}"
                )


@dataclass
class _Overlaps:
    """Per-image segment table: ground-truth rows, predicted columns, pixel counts."""

    g_ids: np.ndarray  # (G,) ground-truth segment ids, segments_info order
    g_cat: np.ndarray  # (G,)
    g_crowd: np.ndarray  # (G,) bool
    g_area: np.ndarray  # (G,)
    p_ids: np.ndarray  # (P,) predicted segment ids, segments_info order
    p_cat: np.ndarray  # (P,)
    p_area: np.ndarray  # (P,) pixels of each predicted segment
    void: np.ndarray  # (P,) pixels of each predicted segment on ground-truth void
    inter: np.ndarray  # (G, P) intersections


def _overlaps(
    gt_segs: Mapping[int, Segment],
    pred_segs: Mapping[int, Segment],
    gt_labels: np.ndarray,
    pred_labels: np.ndarray,
    conf: np.ndarray,
) -> _Overlaps:
    p_ids = np.fromiter(pred_segs, dtype=np.int64, count=len(pred_segs))
    cols = np.searchsorted(pred_labels, p_ids)  # every predicted segment is in the PNG
    void_row = np.flatnonzero(gt_labels == VOID)
    g_ids = np.fromiter(gt_segs, dtype=np.int64, count=len(gt_segs))
    rows = np.clip(np.searchsorted(gt_labels, g_ids), 0, max(len(gt_labels) - 1, 0))
    present = gt_labels[rows] == g_ids if len(gt_labels) else np.zeros(len(g_ids), dtype=bool)
    inter = np.zeros((len(g_ids), len(p_ids)), dtype=np.int64)
    inter[present] = conf[rows[present]][:, cols]
    png_area = np.zeros(len(g_ids), dtype=np.int64)  # used only where the JSON has no area
    png_area[present] = conf[rows[present]].sum(axis=1)
    segs = list(gt_segs.values())
    return _Overlaps(
        g_ids=g_ids,
        g_cat=np.array([int(s["category_id"]) for s in segs], dtype=np.int64),
        g_crowd=np.array([int(s.get("iscrowd", 0)) == 1 for s in segs], dtype=bool),
        g_area=np.array(
            [int(s["area"]) if "area" in s else int(a) for s, a in zip(segs, png_area)],
            dtype=np.int64,
        ),
        p_ids=p_ids,
        p_cat=np.array([int(s["category_id"]) for s in pred_segs.values()], dtype=np.int64),
        p_area=conf[:, cols].sum(axis=0),
        void=conf[void_row[0], cols] if len(void_row) else np.zeros(len(p_ids), np.int64),
        inter=inter,
    )


def pq_image_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Segment],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Segment],
    categories: Categories,
    *,
    where: str = "image",
) -> PQStat:
    """PQ statistics of one image from its ground-truth and predicted segment-id maps.

    Args:
        gt_ids, pred_ids: (H, W) integer segment ids (0 is void in the ground truth).
        gt_segments: ground-truth ``segments_info`` (``id``, ``category_id``, ``iscrowd``,
            optional ``area``); pred_segments: predicted ``segments_info`` (``id``,
            ``category_id``), category ids in the dataset's id space.
        categories: dataset category id -> ``{"isthing": 0/1, ...}``.
        where: names the image or file in error messages.
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise DatasetError(
            f"{where}: prediction has size {pred_ids.shape} (H, W) "
            f"but ground truth has {gt_ids.shape}"
        )
    gt_segs = _index_segments(gt_segments, where, "ground-truth")
    pred_segs = _index_segments(pred_segments, where, "predicted")
    gt_labels, pred_labels, conf = _confusion(gt_ids, pred_ids, where)
    _check_segments(gt_segs, pred_segs, pred_labels, categories, where)
    o = _overlaps(gt_segs, pred_segs, gt_labels, pred_labels, conf)
    stat = PQStat()

    # true positives: same category, non-crowd ground truth, IoU > 0.5 with void taken out
    union = o.p_area[None, :] + o.g_area[:, None] - o.inter - o.void[None, :]
    candidate = (o.inter > 0) & (o.g_cat[:, None] == o.p_cat[None, :]) & ~o.g_crowd[:, None]
    iou = np.zeros(o.inter.shape, dtype=np.float64)
    np.divide(o.inter, union, out=iou, where=candidate)
    matched = candidate & (iou > 0.5)
    rows, cols = np.nonzero(matched)
    for s, j in sorted(zip(rows, cols), key=lambda sj: (o.g_ids[sj[0]], o.p_ids[sj[1]])):
        cat = stat[int(o.g_cat[s])]  # summed in (gt id, pred id) order, as the reference
        cat.tp += 1
        cat.iou += float(iou[s, j])
    gt_matched = matched.any(axis=1)

    # false negatives: unmatched non-crowd ground truth; remember each category's crowd
    crowd_of: Dict[int, int] = {}
    for s in np.flatnonzero(~gt_matched):
        if o.g_crowd[s]:
            crowd_of[int(o.g_cat[s])] = s  # the last one wins, as in the reference
        else:
            stat[int(o.g_cat[s])].fn += 1

    # false positives: unmatched predictions not mostly on void or their category's crowd
    for j in np.flatnonzero(~matched.any(axis=0)):
        category = int(o.p_cat[j])
        ignored = int(o.void[j])
        if category in crowd_of:
            ignored += int(o.inter[crowd_of[category], j])
        if ignored / o.p_area[j] > 0.5:
            continue
        stat[category].fp += 1
    return stat


# --------------------------------------------------------------------------- files


def _load_json(source: Union[PathLike, Mapping[str, Any]], what: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    try:
        with open(source, "r") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {source}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{what} {source} is not valid JSON: {e}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{what} {source} has no 'annotations' list (COCO panoptic format)")
    return data


_ANNOTATION_FIELDS = ("image_id", "file_name", "segments_info")


def _check_annotations(data: Mapping[str, Any], name: Any) -> None:
    """Refuse an annotation without image_id / file_name / segments_info: scoring it as
    "no segments" would give a plausible but wrong PQ instead of naming the broken file."""
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in _ANNOTATION_FIELDS if not isinstance(ann, Mapping) or k not in ann]
        if missing:
            raise DatasetError(
                f"{name}: annotation #{i} lacks required field(s) {', '.join(missing)} "
                f"(expected {', '.join(_ANNOTATION_FIELDS)})"
            )


def normalize_categories(categories: CategoriesLike) -> Categories:
    """Category list (COCO JSON) or id -> info mapping, as ``{int id: info}``."""
    if isinstance(categories, Mapping):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}


def _image_task(
    task: Tuple[Mapping[str, Any], Mapping[str, Any], str, str, Categories],
) -> PQStat:
    gt_ann, pred_ann, gt_dir, pred_dir, categories = task
    gt_path = os.path.join(gt_dir, gt_ann["file_name"])
    pred_path = os.path.join(pred_dir, pred_ann["file_name"])
    gt = read_panoptic_png(gt_path)
    pred = read_panoptic_png(pred_path)
    if gt.shape != pred.shape:
        raise DatasetError(
            f"{pred_path} is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
            f"{gt_path} is {gt.shape[1]}x{gt.shape[0]} (width x height)"
        )
    return pq_image_stats(
        gt,
        gt_ann.get("segments_info", []),
        pred,
        pred_ann.get("segments_info", []),
        categories,
        where=f"{pred_path} (image_id {gt_ann.get('image_id')!r})",
    )


def _chunk_task(tasks: List[tuple]) -> PQStat:
    stat = PQStat()
    for task in tasks:
        stat += _image_task(task)
    return stat


def pq_compute(
    gt_json: Union[PathLike, Mapping[str, Any]],
    gt_dir: PathLike,
    pred_json: Union[PathLike, Mapping[str, Any]],
    pred_dir: PathLike,
    categories: Optional[CategoriesLike] = None,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> Dict[str, Any]:
    """PQ / SQ / RQ of a prediction folder in COCO panoptic format, as panopticapi's ``pq_compute``.

    Args:
        gt_json, pred_json: COCO panoptic JSON files (or their loaded dicts); every
            ground-truth image needs a prediction with the same ``image_id``.
        gt_dir, pred_dir: folders of the PNGs named by the annotations' ``file_name``.
        categories: defaults to the ground truth's ``categories`` (they need ``isthing``).
        num_workers: processes for large sets (0 = in this process).
        progress: show a progress bar.

    Returns:
        ``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id:
        {"pq", "sq", "rq", "tp", "fp", "fn"}}}`` with values in [0, 1].
    """
    gt_name = gt_json if not isinstance(gt_json, Mapping) else "ground-truth JSON"
    pred_name = pred_json if not isinstance(pred_json, Mapping) else "prediction JSON"
    gt = _load_json(gt_json, "ground-truth JSON")
    pred = _load_json(pred_json, "prediction JSON")
    if categories is None:
        if "categories" not in gt:
            raise DatasetError(f"{gt_name} has no 'categories' list")
        categories = gt["categories"]
    categories = normalize_categories(categories)
    for folder, what in ((gt_dir, "ground-truth PNG folder"), (pred_dir, "prediction PNG folder")):
        if not os.path.isdir(folder):
            raise DatasetError(f"{what} not found: {folder}")

    _check_annotations(gt, gt_name)
    _check_annotations(pred, pred_name)
    pred_by_image: Dict[Any, Mapping[str, Any]] = {}
    for ann in pred["annotations"]:
        if ann.get("image_id") in pred_by_image:
            raise DatasetError(f"{pred_name}: image_id {ann.get('image_id')!r} appears twice")
        pred_by_image[ann.get("image_id")] = ann
    tasks = []
    for gt_ann in gt["annotations"]:
        image_id = gt_ann.get("image_id")
        if image_id not in pred_by_image:
            raise DatasetError(
                f"{pred_name}: no prediction for image_id {image_id!r} "
                f"(ground truth {gt_ann.get('file_name')})"
            )
        tasks.append((gt_ann, pred_by_image[image_id], str(gt_dir), str(pred_dir), categories))

    stat = PQStat()
    if num_workers > 0 and len(tasks) > 1:
        chunks = [tasks[i :: num_workers * 4] for i in range(min(len(tasks), num_workers * 4))]
        # spawn, not fork: callers may hold torch / CUDA threads that a fork would copy
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
            for part in _progress(pool.map(_chunk_task, chunks), len(chunks), progress, "chunk"):
                stat += part
    else:
        for task in _progress(tasks, len(tasks), progress, "img"):
            stat += _image_task(task)
    return pq_results(stat, categories)


def _progress(iterable: Iterable, total: int, enabled: bool, unit: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="PQ", unit=unit)
