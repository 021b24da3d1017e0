"""Reading detectron2 panoptic dataset dicts for the memory (images and segment maps)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from maps.errors import DatasetError

__all__ = ["load_dataset_dicts", "read_image", "read_segment_map", "category_names"]


def load_dataset_dicts(name: str) -> List[Dict]:
    """``DatasetCatalog.get(name)``, with the library's datasets registered first."""
    from detectron2.data import DatasetCatalog

    try:
        import maps.data  # noqa: F401  (registers synthetic / COCO / ADE20K / Cityscapes)
    except Exception:  # the memory must stay usable whatever the data package's state
        pass
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset {name!r} is not registered in detectron2's DatasetCatalog "
                           f"(known: {', '.join(sorted(DatasetCatalog.list())[:12])}, ...)")
    try:
        dicts = DatasetCatalog.get(name)
    except MemoryError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot load dataset {name!r}: {type(e).__name__}: {e}") from None
    if not dicts:
        raise DatasetError(f"dataset {name!r} is empty")
    return dicts


def read_image(d: Dict) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a dataset dict."""
    from PIL import Image

    try:
        with Image.open(d["file_name"]) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, KeyError) as e:
        raise DatasetError(f"cannot read image {d.get('file_name')!r}: {e}") from None


def read_segment_map(d: Dict) -> np.ndarray:
    """Panoptic segment ids (H, W) int64 from the PNG: id = R + 256 G + 256^2 B."""
    from PIL import Image

    path = d.get("pan_seg_file_name")
    if not path:
        raise DatasetError(f"dataset dict of {d.get('file_name')!r} has no pan_seg_file_name: "
                           f"the object memory needs panoptic annotations")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except OSError as e:
        raise DatasetError(f"cannot read panoptic PNG {path!r}: {e}") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def category_names(dataset: str) -> Dict[int, str]:
    """Category id (as in the dataset dicts) -> name, from the dataset's metadata."""
    from detectron2.data import MetadataCatalog

    try:
        meta = MetadataCatalog.get(dataset)
    except Exception:
        return {}
    names = meta.get("stuff_classes", None) or meta.get("thing_classes", None) or []
    return {i: n for i, n in enumerate(names)}
