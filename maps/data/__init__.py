"""Datasets of the suite: registration (importing this package is enough), mappers, synthetic scenes.

Importing :mod:`maps.data` registers in detectron2's catalogs, under ``$DETECTRON2_DATASETS``
(or ``./datasets``): ``synthetic_train`` / ``synthetic_val``,
``coco_2017_{train,val}_panoptic_with_sem_seg``, ``ade20k_panoptic_{train,val}`` and a
checked version of detectron2's ``cityscapes_fine_panoptic_{train,val}``.
"""
from __future__ import annotations

import detectron2.data.datasets  # noqa: F401  (detectron2's builtin registrations come first)

from .datasets import (
    datasets_root,
    load_panoptic_json,
    panoptic_metadata,
    register_all,
    register_ade20k_panoptic,
    register_cityscapes_panoptic,
    register_coco_panoptic_with_sem_seg,
    register_panoptic,
    register_synthetic,
)
from .mappers import (
    AUGMENTATIONS,
    PanopticDatasetMapper,
    build_augmentation,
    build_train_mapper,
    read_panoptic_png,
)
from .synthetic import (
    SCENES,
    SYNTHETIC_CATEGORIES,
    generate_synthetic_dataset,
    read_manifest,
    render_scene,
)

__all__ = [
    "AUGMENTATIONS",
    "PanopticDatasetMapper",
    "SCENES",
    "SYNTHETIC_CATEGORIES",
    "build_augmentation",
    "build_train_mapper",
    "datasets_root",
    "generate_synthetic_dataset",
    "load_panoptic_json",
    "panoptic_metadata",
    "read_manifest",
    "read_panoptic_png",
    "register_ade20k_panoptic",
    "register_all",
    "register_cityscapes_panoptic",
    "register_coco_panoptic_with_sem_seg",
    "register_panoptic",
    "register_synthetic",
    "render_scene",
]

register_all()
