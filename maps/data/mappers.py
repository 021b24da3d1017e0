"""Mask2Former's panoptic dataset mapper, with a hook that attaches retrieved memory.

The mapper turns one detectron2 dataset dict (as registered in :mod:`maps.data.datasets`)
into what the model eats: ``image`` (CHW uint8 tensor) and, when training, ``instances``
with one target per non-crowd segment (``gt_classes`` contiguous ids, ``gt_masks`` a bool
``(N, H, W)`` tensor as Mask2Former's ``prepare_targets`` expects, ``gt_boxes``).

Augmentations are chosen by ``INPUT.DATASET_MAPPER_NAME``:

* ``coco_panoptic_lsj``: Mask2Former's COCO recipe (``COCOPanopticNewBaselineDatasetMapper``):
  horizontal flip, large-scale jitter to ``INPUT.IMAGE_SIZE`` x [``MIN_SCALE``, ``MAX_SCALE``],
  fixed-size crop / pad to ``IMAGE_SIZE``.
* ``mask_former_panoptic``: Mask2Former's ADE20K / Cityscapes recipe
  (``MaskFormerPanopticDatasetMapper``): ``ResizeShortestEdge`` (``INPUT.MIN_SIZE_TRAIN`` ...),
  optional crop (``INPUT.CROP``, with ``SINGLE_CATEGORY_MAX_AREA``), optional SSD colour
  jitter (``INPUT.COLOR_AUG_SSD``), ``RandomFlip`` (``INPUT.RANDOM_FLIP``).

``INPUT.SIZE_DIVISIBILITY`` > 0 pads the training image (value 128) and label (void) at the
bottom/right to a multiple of it, as Mask2Former's ``MaskFormerPanopticDatasetMapper`` does.

Memory: whatever the caller put under ``dataset_dict["memory"]`` passes through unchanged
(see :mod:`maps.memory.tokens`); or give ``memory_fn(dataset_dict) -> dict`` and its result
is stored there. Retrieval is per image, not per augmented view, so the hook sees the dict
as registered (before any transform).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from maps.errors import ConfigError, DatasetError

from .augmentations import ColorAugSSD

__all__ = ["PanopticDatasetMapper", "build_augmentation", "build_train_mapper", "AUGMENTATIONS",
           "read_panoptic_png"]

logger = logging.getLogger(__name__)

MemoryFn = Callable[[Dict], Mapping]

#: bytes of decoded images and panoptic ids one mapper keeps in memory (see
#: :class:`DecodedCache`); 0 turns the cache off
DECODED_CACHE_BYTES = 256 * 2**20


def _lsj(cfg, is_train: bool) -> List[T.Augmentation]:
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    size = cfg.INPUT.IMAGE_SIZE
    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    # pad the label with 0 (void), not detectron2's 255, which could be a real segment id
    augs += [T.ResizeScale(min_scale=cfg.INPUT.MIN_SCALE, max_scale=cfg.INPUT.MAX_SCALE,
                           target_height=size, target_width=size),
             T.FixedSizeCrop(crop_size=(size, size), seg_pad_value=0)]
    return augs


def _resize_flip(cfg, is_train: bool) -> List[T.Augmentation]:
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    augs: List[T.Augmentation] = [T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSD(cfg.INPUT.FORMAT))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs


# INPUT.DATASET_MAPPER_NAME -> augmentation recipe
AUGMENTATIONS: Dict[str, Callable] = {
    "coco_panoptic_lsj": _lsj,
    "mask_former_panoptic": _resize_flip,
}


def build_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """The augmentations of ``cfg.INPUT.DATASET_MAPPER_NAME`` (see :data:`AUGMENTATIONS`)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in AUGMENTATIONS:
        raise ConfigError(f"INPUT.DATASET_MAPPER_NAME: unknown mapper {name!r}; "
                          f"expected one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](cfg, is_train)


def _read_image(dataset_dict: Dict, image_format: str) -> np.ndarray:
    path = dataset_dict["file_name"]
    try:
        image = utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image of image_id {dataset_dict.get('image_id')} "
                           f"not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: unreadable or truncated image ({e}); expected a JPEG/PNG") from None
    try:
        utils.check_image_size(dataset_dict, image)
    except utils.SizeMismatchError as e:
        raise DatasetError(f"{path}: {e}") from None
    return image


def read_panoptic_png(path: str) -> np.ndarray:
    """Segment ids (int64, ``R + 256 G + 256^2 B``) of a COCO panoptic PNG."""
    try:
        rgb = utils.read_image(path, "RGB").astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: panoptic PNG not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: unreadable or truncated panoptic PNG ({e})") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _check_segments(path: str, pan: np.ndarray, segments: List[Dict], image_id) -> None:
    """Every listed segment occurs in the PNG and every non-void id of the PNG is listed."""
    present = set(np.unique(pan).tolist()) - {0}
    listed = {int(s["id"]) for s in segments}
    absent = sorted(listed - present)
    if absent:
        raise DatasetError(f"{path}: segment id {absent[0]} listed in the annotation of image "
                           f"{image_id} does not occur in the PNG ({len(absent)} such id(s))")
    unlisted = sorted(present - listed)
    if unlisted:
        raise DatasetError(f"{path}: PNG contains segment id {unlisted[0]} that the annotation of "
                           f"image {image_id} does not list ({len(unlisted)} such id(s))")


def _semantic_map(pan: np.ndarray, segments: List[Dict]) -> np.ndarray:
    """Contiguous class of each pixel (255 = void), for category-aware cropping."""
    sem = np.full(pan.shape, 255, np.uint8)
    for seg in segments:
        sem[pan == seg["id"]] = seg["category_id"]
    return sem


class DecodedCache:
    """Decoded, checked images and panoptic ids of files already read, up to ``max_bytes``.

    A training run reads every image once per epoch; a small dataset (the synthetic one: 400
    images of 128 px, ~45 MB decoded) is decoded and checked once instead. A dataset that
    does not fit is not cached at all: the first time the budget overflows, the cache empties
    and turns itself off (with random access a partial cache would hardly ever hit, and COCO
    would hold the budget's memory in every data-loader worker for nothing). Entries are
    handed out as copies, so nothing downstream can change what the next epoch gets.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.used = 0
        self._items: Dict[tuple, tuple] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: tuple) -> Optional[tuple]:
        item = self._items.get(key)
        return None if item is None else tuple(None if a is None else a.copy() for a in item)

    def put(self, key: tuple, arrays: tuple) -> None:
        if not self.enabled or key in self._items:
            return
        size = sum(a.nbytes for a in arrays if a is not None)
        if self.used + size > self.max_bytes:
            self._items.clear()
            self.used = self.max_bytes = 0
            return
        self._items[key] = tuple(None if a is None else a.copy() for a in arrays)
        self.used += size

    def __len__(self) -> int:
        return len(self._items)


class PanopticDatasetMapper:
    """Dataset dict -> model input for panoptic training (Mask2Former's targets).

    Reads the image and the panoptic PNG, checks they agree with the annotation, applies the
    augmentations, and builds one target per non-crowd segment that is still visible after
    cropping (an empty mask gives the matcher nothing to match). With ``is_train=False`` only
    the image is produced (resized for inference) and the annotations are dropped, as in
    detectron2's ``DatasetMapper``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        size_divisibility: int = -1,
        memory_fn: Optional[MemoryFn] = None,
        cache_bytes: Optional[int] = None,
    ):
        """``cache_bytes``: the :class:`DecodedCache` budget (default
        :data:`DECODED_CACHE_BYTES`; 0: read every image from disk every time)."""
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.memory_fn = memory_fn
        self.cache = DecodedCache(DECODED_CACHE_BYTES if cache_bytes is None else cache_bytes)
        # the category-area crop looks at a semantic map; build one only when it is used
        self._needs_sem_seg = any(
            isinstance(a, T.RandomCrop_CategoryAreaConstraint) and a.single_category_max_area < 1.0
            for a in augmentations)
        logger.info(f"[PanopticDatasetMapper] is_train={is_train} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, memory_fn: Optional[MemoryFn] = None):
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY if is_train else -1,
            "memory_fn": memory_fn,
        }

    def attach_memory(self, dataset_dict: Dict) -> None:
        """The memory hook: ``dataset_dict["memory"] = memory_fn(dataset_dict)`` if a fn is set."""
        if self.memory_fn is not None:
            dataset_dict["memory"] = self.memory_fn(dataset_dict)

    def __call__(self, dataset_dict: Dict) -> Dict:
        memory = dataset_dict.get("memory")  # tensors: passed by reference, never deep-copied
        dataset_dict = copy.deepcopy({k: v for k, v in dataset_dict.items() if k != "memory"})
        if memory is not None:
            dataset_dict["memory"] = memory
        self.attach_memory(dataset_dict)

        segments = dataset_dict.pop("segments_info", None)
        pan_file = dataset_dict.pop("pan_seg_file_name", None)
        dataset_dict.pop("sem_seg_file_name", None)
        dataset_dict.pop("annotations", None)
        image, pan = self._decoded(dataset_dict, pan_file, segments)
        dataset_dict.setdefault("height", image.shape[0])
        dataset_dict.setdefault("width", image.shape[1])

        sem = _semantic_map(pan, segments) if pan is not None and self._needs_sem_seg else None
        aug_input = T.AugInput(image, sem_seg=sem)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        if pan is not None:
            # ids < 2^24 are exact in float32, which detectron2's resize interpolates (int64: no)
            pan = transforms.apply_segmentation(pan.astype(np.float32)).astype(np.int64)
        image, pan = self._pad(image, pan)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if pan is not None:
            dataset_dict["instances"] = self._targets(pan, segments, image.shape[:2])
        return dataset_dict

    def _decoded(self, dataset_dict: Dict, pan_file: Optional[str], segments: Optional[List[Dict]]):
        """The image and (training) the panoptic ids of ``dataset_dict``, read and checked, or
        copies of what an earlier epoch read (:class:`DecodedCache`)."""
        # the segment ids are part of the key: the PNG was checked against them
        key = (dataset_dict["file_name"], pan_file if self.is_train else None,
               tuple(int(seg["id"]) for seg in segments or ()) if self.is_train else ())
        cached = self.cache.get(key)
        if cached is not None:
            image, pan = cached
            return image, None if pan is None else pan.astype(np.int64)
        image = _read_image(dataset_dict, self.image_format)
        pan = None
        if self.is_train:
            if pan_file is None or segments is None:
                raise DatasetError(f"{dataset_dict['file_name']}: training needs 'pan_seg_file_name' "
                                   f"and 'segments_info' in the dataset dict (a panoptic dataset)")
            pan = read_panoptic_png(pan_file)
            if pan.shape != image.shape[:2]:
                raise DatasetError(f"{pan_file}: panoptic PNG is {pan.shape[1]}x{pan.shape[0]}, "
                                   f"its image {image.shape[1]}x{image.shape[0]}")
            _check_segments(pan_file, pan, segments, dataset_dict.get("image_id"))
        # ids are < 2^24 (three 8-bit channels): int32 holds them in half the bytes
        self.cache.put(key, (image, None if pan is None else pan.astype(np.int32)))
        return image, pan

    def _pad(self, image: np.ndarray, pan: Optional[np.ndarray]):
        """Pad bottom/right to a multiple of ``size_divisibility`` (image 128, label void 0)."""
        d = self.size_divisibility
        if d <= 0:
            return image, pan
        h, w = image.shape[:2]
        ph, pw = -h % d, -w % d
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=128)
            if pan is not None:
                pan = np.pad(pan, ((0, ph), (0, pw)), constant_values=0)
        return image, pan

    @staticmethod
    def _targets(pan: np.ndarray, segments: List[Dict], image_size) -> Instances:
        classes, masks = [], []
        for seg in segments:
            if seg.get("iscrowd", 0):
                continue
            mask = pan == seg["id"]
            if mask.any():
                classes.append(seg["category_id"])
                masks.append(mask)
        instances = Instances(image_size)
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            bit = BitMasks(torch.from_numpy(np.ascontiguousarray(np.stack(masks))))
            instances.gt_masks = bit.tensor
            instances.gt_boxes = bit.get_bounding_boxes()
        else:
            instances.gt_masks = torch.zeros((0,) + tuple(image_size), dtype=torch.bool)
            instances.gt_boxes = Boxes(torch.zeros((0, 4)))
        return instances


def build_train_mapper(cfg, memory_fn: Optional[MemoryFn] = None) -> PanopticDatasetMapper:
    """The training mapper of ``cfg`` (what ``DefaultTrainer.build_train_loader`` should use)."""
    return PanopticDatasetMapper(cfg, is_train=True, memory_fn=memory_fn)
