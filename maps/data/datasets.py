"""Dataset registration: synthetic scenes, COCO, ADE20K and Cityscapes panoptic.

Each dataset is registered in detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` under the
name Mask2Former uses, with the metadata its evaluators and mappers read. Loading is lazy
(the catalog calls the loader) and strict: a missing or malformed dataset raises
:class:`maps.errors.DatasetError` naming the file and what was expected, instead of a
``KeyError`` deep inside a data-loader worker an hour into training.

Roots follow detectron2: ``$DETECTRON2_DATASETS`` or ``./datasets``.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from maps.errors import DatasetError

from .categories import ADE20K_150_CATEGORIES, COCO_CATEGORIES
from .synthetic import SYNTHETIC_CATEGORIES, SCENES

__all__ = [
    "datasets_root",
    "panoptic_metadata",
    "load_panoptic_json",
    "register_panoptic",
    "register_synthetic",
    "register_coco_panoptic_with_sem_seg",
    "register_ade20k_panoptic",
    "register_cityscapes_panoptic",
    "register_all",
]


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (``~`` expanded) or ``datasets``, as detectron2 resolves it."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def panoptic_metadata(categories: Sequence[Mapping]) -> Dict:
    """Mask2Former's metadata of a panoptic category list.

    The contiguous id of a category is its position in ``categories``. As in Mask2Former,
    ``stuff_classes`` names every category (one classifier over things and stuff) and
    ``stuff_dataset_id_to_contiguous_id`` maps every category, things included: detectron2's
    ``SemSegEvaluator`` converts all predicted labels through that map. Loaders test the
    thing map first, so ``isthing`` stays right.
    """
    thing_map = {c["id"]: i for i, c in enumerate(categories) if c["isthing"]}
    stuff_map = {c["id"]: i for i, c in enumerate(categories)}
    return {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "thing_colors": [list(c["color"]) for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": thing_map,
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


# ------------------------------------- loading -----------------------------------------

_ANNOTATION_FIELDS = ("image_id", "file_name", "segments_info")
_SEGMENT_FIELDS = ("id", "category_id")


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: {what} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: {what} must be a JSON object, found {type(data).__name__}")
    return data


def _listdir(path: str, what: str) -> set:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: {what} directory not found")
    return set(os.listdir(path))


def load_panoptic_json(
    json_file: str,
    image_dir: str,
    gt_dir: str,
    meta: Mapping,
    semseg_dir: Optional[str] = None,
    image_ext: str = ".jpg",
    missing_hint: str = "",
) -> List[Dict]:
    """Read a COCO-format panoptic dataset into detectron2 dicts, checking it on the way.

    Same output as ``detectron2.data.datasets.coco_panoptic.load_coco_panoptic_json`` (category
    ids made contiguous, ``isthing`` set), plus ``sem_seg_file_name`` when ``semseg_dir`` is
    given (Mask2Former's ``*_with_sem_seg`` datasets) and ``height``/``width``/``scene`` when
    the JSON's ``images`` entries carry them. Checked: the JSON and its required fields, that
    every category id is known to ``meta``, and that the annotation PNGs, images and semantic
    PNGs match the JSON one to one (by directory listing: one ``listdir`` per folder, not one
    ``stat`` per file, which matters for COCO's 118k images on a network file system).
    ``missing_hint`` is appended to the error when the JSON does not exist (how to make it).
    """
    if missing_hint and not os.path.isfile(json_file):
        raise DatasetError(f"{json_file}: panoptic annotation JSON not found; {missing_hint}")
    data = _read_json(json_file, "panoptic annotation JSON")
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise DatasetError(f"{json_file}: missing 'annotations' list (expected the COCO panoptic "
                           f"format: images, annotations, categories)")
    if not anns:
        raise DatasetError(f"{json_file}: 'annotations' is empty; expected one entry per image")
    images = {}
    for img in data.get("images") or []:
        if isinstance(img, dict) and "id" in img:
            images[img["id"]] = img
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]

    pngs = _listdir(gt_dir, "panoptic PNG")
    jpgs = _listdir(image_dir, "image")
    sems = _listdir(semseg_dir, "semantic PNG") if semseg_dir else None

    ret, seen_pngs = [], set()
    for i, ann in enumerate(anns):
        missing = [k for k in _ANNOTATION_FIELDS if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise DatasetError(f"{json_file}: annotation #{i} lacks required field(s) "
                               f"{', '.join(missing)} (expected {', '.join(_ANNOTATION_FIELDS)})")
        image_id, png = ann["image_id"], ann["file_name"]
        stem = os.path.splitext(png)[0]
        if png not in pngs:
            raise DatasetError(f"{os.path.join(gt_dir, png)}: panoptic PNG of image {image_id} "
                               f"(listed in {json_file}) does not exist")
        if stem + image_ext not in jpgs:
            raise DatasetError(f"{os.path.join(image_dir, stem + image_ext)}: image {image_id} "
                               f"(listed in {json_file}) does not exist")
        if sems is not None and png not in sems:
            raise DatasetError(f"{os.path.join(semseg_dir, png)}: semantic PNG of image {image_id} "
                               f"does not exist (expected one per panoptic annotation)")
        seen_pngs.add(png)
        segments = []
        for seg in ann["segments_info"]:
            missing = [k for k in _SEGMENT_FIELDS if not isinstance(seg, dict) or k not in seg]
            if missing:
                raise DatasetError(f"{json_file}: a segment of image {image_id} ({png}) lacks "
                                   f"field(s) {', '.join(missing)} (expected id, category_id)")
            cat = seg["category_id"]
            seg = dict(seg)
            if cat in thing_map:
                seg["category_id"], seg["isthing"] = thing_map[cat], True
            elif cat in stuff_map:
                seg["category_id"], seg["isthing"] = stuff_map[cat], False
            else:
                raise DatasetError(f"{json_file}: segment {seg['id']} of image {image_id} ({png}) "
                                   f"has unknown category_id {cat}; known ids: "
                                   f"{sorted(set(thing_map) | set(stuff_map))}")
            seg.setdefault("iscrowd", 0)
            segments.append(seg)
        record = {
            "file_name": os.path.join(image_dir, stem + image_ext),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(gt_dir, png),
            "segments_info": segments,
        }
        if semseg_dir:
            record["sem_seg_file_name"] = os.path.join(semseg_dir, png)
        img = images.get(image_id, {})
        for key in ("height", "width", "scene"):
            if key in img:
                record[key] = img[key]
        ret.append(record)

    orphans = sorted(p for p in pngs - seen_pngs if p.endswith(".png"))
    if orphans:
        raise DatasetError(f"{os.path.join(gt_dir, orphans[0])}: panoptic PNG has no annotation in "
                           f"{json_file} ({len(orphans)} such PNG(s))")
    return ret


# ------------------------------------ registration -------------------------------------

def _register(name: str, loader: Callable[[], List[Dict]], **metadata) -> None:
    """Register ``name``, replacing an earlier registration of the same name (idempotent)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_panoptic(
    name: str,
    metadata: Mapping,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str],
    instances_json: Optional[str],
    evaluator_type: str = "coco_panoptic_seg",
    missing_hint: str = "",
) -> None:
    """Register one COCO-format panoptic split (Mask2Former's ``*_with_sem_seg`` flavour)."""
    meta = dict(metadata)
    _register(
        name,
        lambda: load_panoptic_json(panoptic_json, image_root, panoptic_root, meta, sem_seg_root,
                                   missing_hint=missing_hint),
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_root,
        json_file=instances_json,
        evaluator_type=evaluator_type,
        ignore_label=255,
        label_divisor=1000,
        **meta,
    )


def register_synthetic(name_prefix: str = "synthetic", root: Optional[str] = None) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` of a synthetic dataset under ``root``.

    ``root`` defaults to ``<datasets_root()>/synthetic``. Registering again replaces the
    earlier entries, so tests can point the same names at their own directories.
    """
    root = os.path.abspath(root if root is not None else os.path.join(datasets_root(), "synthetic"))
    meta = panoptic_metadata(SYNTHETIC_CATEGORIES)
    names = []
    for split in ("train", "val"):
        name = f"{name_prefix}_{split}"
        register_panoptic(
            name, dict(meta, scene_classes=list(SCENES), dataset_root=root),
            image_root=os.path.join(root, split),
            panoptic_root=os.path.join(root, f"panoptic_{split}"),
            panoptic_json=os.path.join(root, f"panoptic_{split}.json"),
            sem_seg_root=os.path.join(root, f"panoptic_semseg_{split}"),
            instances_json=os.path.join(root, f"instances_{split}.json"),
            missing_hint=f"create the dataset with `maps data synth --out {root}`",
        )
        names.append(name)
    return names


def register_coco_panoptic_with_sem_seg(root: str) -> None:
    """``coco_2017_{train,val}_panoptic_with_sem_seg`` in detectron2's COCO layout::

        coco/{train,val}2017/*.jpg
        coco/panoptic_{train,val}2017/*.png, coco/annotations/panoptic_{train,val}2017.json
        coco/panoptic_semseg_{train,val}2017/*.png   (Mask2Former's prepare script)
        coco/annotations/instances_{train,val}2017.json
    """
    meta = panoptic_metadata(COCO_CATEGORIES)
    for split in ("train", "val"):
        coco = os.path.join(root, "coco")
        register_panoptic(
            f"coco_2017_{split}_panoptic_with_sem_seg", meta,
            image_root=os.path.join(coco, f"{split}2017"),
            panoptic_root=os.path.join(coco, f"panoptic_{split}2017"),
            panoptic_json=os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
            sem_seg_root=os.path.join(coco, f"panoptic_semseg_{split}2017"),
            instances_json=os.path.join(coco, "annotations", f"instances_{split}2017.json"),
            missing_hint="expected detectron2's COCO layout (datasets/README.md of detectron2) "
                         "and Mask2Former's panoptic_semseg_* folders",
        )


def register_ade20k_panoptic(root: str) -> None:
    """``ade20k_panoptic_{train,val}`` in Mask2Former's ADEChallengeData2016 layout::

        ADEChallengeData2016/images/{training,validation}/*.jpg
        ADEChallengeData2016/ade20k_panoptic_{train,val}/*.png  + ade20k_panoptic_{train,val}.json
        ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
        ADEChallengeData2016/ade20k_instance_{train,val}.json
    """
    meta = panoptic_metadata(ADE20K_150_CATEGORIES)
    ade = os.path.join(root, "ADEChallengeData2016")
    for split, folder in (("train", "training"), ("val", "validation")):
        register_panoptic(
            f"ade20k_panoptic_{split}", meta,
            image_root=os.path.join(ade, "images", folder),
            panoptic_root=os.path.join(ade, f"ade20k_panoptic_{split}"),
            panoptic_json=os.path.join(ade, f"ade20k_panoptic_{split}.json"),
            sem_seg_root=os.path.join(ade, "annotations_detectron2", folder),
            instances_json=os.path.join(ade, f"ade20k_instance_{split}.json"),
            evaluator_type="ade20k_panoptic_seg",
            missing_hint="expected Mask2Former's ADE20K panoptic layout "
                         "(prepare_ade20k_pan_seg.py, prepare_ade20k_sem_seg.py)",
        )


def register_cityscapes_panoptic(root: str) -> None:
    """Guard detectron2's own ``cityscapes_fine_panoptic_{train,val}`` with existence checks.

    detectron2 registers these names (and Mask2Former uses them as they are); its loader
    fails with a bare ``AssertionError``. The entries are re-registered with the same
    metadata and a loader that first checks the layout and reports the missing path.
    """
    from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic

    for name in ("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val"):
        split = name.rsplit("_", 1)[1]
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}")
        gt_json = gt_dir + ".json"
        meta = MetadataCatalog.get(name).as_dict() if name in MetadataCatalog.list() else {}
        if not meta.get("thing_dataset_id_to_contiguous_id"):
            continue  # this detectron2 has no builtin entry to guard

        def load(x=image_dir, y=gt_dir, z=gt_json, m=meta) -> List[Dict]:
            if not os.path.isdir(x):
                raise DatasetError(f"{x}: Cityscapes image directory (leftImg8bit) not found")
            if not os.path.isdir(y):
                raise DatasetError(f"{y}: Cityscapes panoptic PNG directory not found (run "
                                   f"cityscapesscripts' createPanopticImgs.py)")
            if not os.path.isfile(z):
                raise DatasetError(f"{z}: Cityscapes panoptic JSON not found (run cityscapesscripts' "
                                   f"createPanopticImgs.py)")
            try:
                return load_cityscapes_panoptic(x, y, z, m)
            except (AssertionError, KeyError) as e:
                raise DatasetError(f"{z}: malformed Cityscapes panoptic dataset ({e!r})") from None

        _register(name, load, **{k: v for k, v in meta.items() if k != "name"})


def register_all(root: Optional[str] = None) -> None:
    """Register every dataset this library knows under ``root`` (default :func:`datasets_root`)."""
    root = root if root is not None else datasets_root()
    register_synthetic("synthetic", os.path.join(root, "synthetic"))
    register_coco_panoptic_with_sem_seg(root)
    register_ade20k_panoptic(root)
    register_cityscapes_panoptic(root)
