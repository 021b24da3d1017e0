"""A tiny COCO-panoptic-format dataset written by the tests, and a tiny bank built from it."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "ball", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "box", "isthing": 1, "color": [0, 0, 142]},
    {"id": 7, "name": "floor", "isthing": 0, "color": [120, 120, 120]},
]
TINY = dict(arch="ViT-Tiny-16", seed=3)


def write_panoptic_dataset(root: Path, sizes, seed: int = 0) -> dict:
    """Images of the given (H, W) sizes: a floor plus a few rectangles (one crowd)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations = [], []
    for n, (H, W) in enumerate(sizes):
        seg = np.full((H, W), 1, np.int64)  # segment 1: floor
        img = np.zeros((H, W, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        infos = [{"id": 1, "category_id": 7, "iscrowd": 0}]
        for s in range(2, 2 + int(rng.integers(1, 4))):
            h, w = int(rng.integers(H // 6, H // 2)), int(rng.integers(W // 6, W // 2))
            y, x = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
            seg[y:y + h, x:x + w] = s
            img[y:y + h, x:x + w] = rng.integers(0, 255, 3, dtype=np.uint8)
            infos.append({"id": s, "category_id": int(rng.choice([1, 3])),
                          "iscrowd": int(s == 3)})
        present = set(np.unique(seg).tolist())
        infos = [i for i in infos if i["id"] in present]
        for i in infos:
            ys, xs = np.nonzero(seg == i["id"])
            i["area"] = int(len(ys))
            i["bbox"] = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        stem = f"{n:06d}"
        Image.fromarray(img).save(root / "images" / f"{stem}.jpg", quality=95)
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{stem}.png")
        images.append({"id": 100 + n, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": 100 + n, "file_name": f"{stem}.png",
                            "segments_info": infos})
    (root / "panoptic.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return {"images": images, "annotations": annotations}


def register(root: Path, name: str) -> str:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_panoptic

    meta = {
        "thing_classes": [c["name"] for c in CATEGORIES if c["isthing"]],
        "stuff_classes": [c["name"] for c in CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(CATEGORIES)
                                               if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(CATEGORIES)},
    }
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_panoptic(name, meta, str(root / "images"), str(root / "panoptic"),
                           str(root / "panoptic.json"), None)
    return name


SIZES = [(48, 64), (64, 48), (40, 90), (56, 56), (64, 80), (50, 70), (72, 40)]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pan")
    write_panoptic_dataset(root, SIZES)
    return register(root, f"memtest_{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="session")
def tiny_bank(tiny_dataset, tmp_path_factory):
    from maps.memory.build import build_bank

    out = tmp_path_factory.mktemp("bank") / "bank"
    return build_bank(tiny_dataset, out, dense="tiledclip", batch_size=3, index="flat",
                      progress=False, **TINY)
