"""Generated COCO panoptic ground truth and predictions that exercise every rule of PQ.

Void (id 0), crowd regions, segment ids above 255 (so the G and B channels carry bits),
predictions that lie mostly in void or in a same-category crowd region, category swaps,
shifted and split segments, several thing and stuff categories with non-contiguous ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from maps.evaluation.pq import id2rgb

CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "x"},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "x"},
    {"id": 7, "name": "dog", "isthing": 1, "supercategory": "x"},
    {"id": 92, "name": "sky", "isthing": 0, "supercategory": "y"},
    {"id": 100, "name": "road", "isthing": 0, "supercategory": "y"},
    {"id": 184, "name": "grass", "isthing": 0, "supercategory": "y"},
]
THINGS = [c["id"] for c in CATEGORIES if c["isthing"]]
STUFF = [c["id"] for c in CATEGORIES if not c["isthing"]]


def _fresh_ids(rng: np.random.Generator, n: int) -> List[int]:
    """n distinct ids in [256, 2^24): every channel of the PNG matters."""
    ids: List[int] = []
    while len(ids) < n:
        ids = list(dict.fromkeys(ids + [int(x) for x in rng.integers(256, 1 << 24, size=n)]))
    return ids[:n]


def _segments(ids: np.ndarray, cat_of: Dict[int, int], crowd: set) -> List[Dict[str, Any]]:
    labels, counts = np.unique(ids, return_counts=True)
    return [
        {"id": int(l), "category_id": cat_of[int(l)], "iscrowd": int(int(l) in crowd), "area": int(c)}
        for l, c in zip(labels, counts)
        if l != 0
    ]


def _random_gt(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, Dict[int, int], set]:
    """Stuff bands, thing rectangles (some crowd) on top, then void holes."""
    ids = np.zeros((h, w), dtype=np.int64)
    cat_of: Dict[int, int] = {}
    crowd: set = set()
    fresh = iter(_fresh_ids(rng, 64))
    cuts = sorted(rng.choice(np.arange(4, h - 4), size=2, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, h]):
        seg = next(fresh)
        ids[lo:hi] = seg
        cat_of[seg] = int(rng.choice(STUFF))
    for _ in range(rng.integers(3, 8)):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        hh, ww = rng.integers(3, h // 2), rng.integers(3, w // 2)
        seg = next(fresh)
        ids[y : y + hh, x : x + ww] = seg
        cat_of[seg] = int(rng.choice(THINGS))
        if rng.random() < 0.25:
            crowd.add(seg)
    for _ in range(rng.integers(1, 4)):  # void
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        ids[y : y + rng.integers(2, 8), x : x + rng.integers(2, 10)] = 0
    return ids, cat_of, crowd


def _perturb(
    rng: np.random.Generator, gt: np.ndarray, gt_cat: Dict[int, int], crowd: set
) -> Tuple[np.ndarray, Dict[int, int]]:
    """A plausible prediction: shifted, relabelled, some segments split, spurious blobs."""
    h, w = gt.shape
    dy, dx = rng.integers(-2, 3, size=2)
    shifted = np.roll(gt, (int(dy), int(dx)), axis=(0, 1))
    labels = [int(l) for l in np.unique(shifted)]
    new_ids = iter(_fresh_ids(rng, 4 * len(labels) + 40))
    pred = np.zeros_like(gt)
    cat_of: Dict[int, int] = {}
    for label in labels:
        mask = shifted == label
        if label == 0:  # void in the ground truth: the model predicts something there
            seg = next(new_ids)
            pred[mask] = seg
            cat_of[seg] = int(rng.choice(STUFF + THINGS))
            continue
        cat = gt_cat[label]
        if rng.random() < 0.15:
            cat = int(rng.choice(THINGS if cat in THINGS else STUFF))
        if rng.random() < 0.2:  # split in two halves by column
            cols = np.nonzero(mask.any(axis=0))[0]
            mid = cols[len(cols) // 2]
            for part in (mask & (np.arange(w)[None] < mid), mask & (np.arange(w)[None] >= mid)):
                if part.any():
                    seg = next(new_ids)
                    pred[part] = seg
                    cat_of[seg] = cat
            continue
        seg = next(new_ids)
        pred[mask] = seg
        cat_of[seg] = cat
    # spurious blobs, some inside crowd regions with the crowd's category
    for label in list(crowd)[:2]:
        ys, xs = np.nonzero(gt == label)
        if len(ys) > 4:
            seg = next(new_ids)
            pred[ys.min() : ys.min() + 2, xs.min() : xs.min() + 3] = seg
            cat_of[seg] = gt_cat[label]
    for _ in range(rng.integers(0, 3)):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        seg = next(new_ids)
        pred[y : y + 3, x : x + 3] = seg
        cat_of[seg] = int(rng.choice(THINGS))
    if rng.random() < 0.5:  # some predicted void
        pred[: rng.integers(1, 4), : rng.integers(1, 6)] = 0
    return pred, cat_of


def write_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(path)


def make_generated_fixture(
    root: Path, seed: int = 0, n_images: int = 6, size: Tuple[int, int] = (40, 56)
) -> Dict[str, Path]:
    """Write gt/pred JSON + PNG folders under ``root``; returns their paths."""
    rng = np.random.default_rng(seed)
    gt_anns, pred_anns, images = [], [], []
    for i in range(n_images):
        h, w = size
        gt, gt_cat, crowd = _random_gt(rng, h, w)
        pred, pred_cat = _perturb(rng, gt, gt_cat, crowd)
        name = f"{i:012d}"
        write_png(root / "gt" / f"{name}.png", gt)
        write_png(root / "pred" / f"{name}.png", pred)
        images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        gt_segments = _segments(gt, gt_cat, crowd)
        gt_anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": gt_segments})
        pred_segs = _segments(pred, pred_cat, set())
        for s in pred_segs:
            del s["iscrowd"]
        pred_anns.append({"image_id": i, "file_name": f"{name}.png", "segments_info": pred_segs})
    paths = {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }
    gt_json = {"images": images, "annotations": gt_anns, "categories": CATEGORIES}
    paths["gt_json"].write_text(json.dumps(gt_json))
    pred_json = {"images": images, "annotations": pred_anns, "categories": CATEGORIES}
    paths["pred_json"].write_text(json.dumps(pred_json))
    return paths
