"""The MAPS meta-architecture: Mask2Former, optionally reading retrieved memory.

With ``MODEL.MAPS.ENABLED`` False this is Mask2Former's ``MaskFormer`` meta-architecture,
parameter for parameter and output for output. With it True, each input dict carries the
tokens retrieved for its image under ``"memory"`` (see :mod:`maps.memory.tokens`); they are
padded into one :class:`MemoryTokens` batch and handed to the transformer decoder, whose
memory layers fuse them into the queries (paper Eq. 1).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from maps.errors import ConfigError
from maps.memory.tokens import MemoryTokens
from maps.modeling.postprocessing import (
    instance_inference,
    panoptic_inference,
    sem_seg_postprocess,
    semantic_inference,
)

__all__ = ["MAPS"]


@META_ARCH_REGISTRY.register()
class MAPS(nn.Module):
    """Backbone -> MaskFormerHead (pixel decoder + masked-attention decoder) -> set
    criterion in training, or semantic / panoptic / instance inference in evaluation."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        test_topk_per_image: int,
        memory_enabled: bool = False,
    ):
        """
        Args:
            size_divisibility: pad the batch to a multiple of this (the decoder's coarsest
                stride); < 0 means the backbone's own ``size_divisibility``.
            sem_seg_postprocess_before_inference: resize mask logits to the output size
                before inference (needed by panoptic and instance inference).
            metadata: the training dataset's metadata; panoptic inference reads its
                ``thing_dataset_id_to_contiguous_id`` to tell things from stuff.
            memory_enabled: read ``"memory"`` from every input and pass it to the decoder.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.metadata = metadata
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image
        self.memory_enabled = memory_enabled
        if not (semantic_on or panoptic_on or instance_on):
            raise ConfigError("MODEL.MASK_FORMER.TEST: SEMANTIC_ON, PANOPTIC_ON and INSTANCE_ON "
                              "are all False; inference would return nothing")

    @classmethod
    def from_config(cls, cfg) -> dict:
        from maps.modeling.criterion import SetCriterion

        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        criterion = SetCriterion(cfg)
        mf = cfg.MODEL.MASK_FORMER
        test = mf.TEST
        train_sets = cfg.DATASETS.TRAIN
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(train_sets[0]) if len(train_sets) else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "memory_enabled": cfg.MODEL.MAPS.ENABLED,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    # --- forward ------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]) -> List[Dict] | Dict[str, Tensor]:
        """
        Args:
            batched_inputs: detectron2's list of dicts, each with "image" (C, H, W) in the
                backbone's format, and in training "instances" (gt_classes, gt_masks); with
                memory enabled, "memory" (see :mod:`maps.memory.tokens`); optionally
                "height"/"width", the output size in evaluation.

        Returns:
            training: the weighted losses of the set criterion.
            evaluation: per image, {"sem_seg", "panoptic_seg", "instances"} as enabled by
                MODEL.MASK_FORMER.TEST.*_ON, at the input's "height" x "width".
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        memory = self.collate_memory(batched_inputs)
        outputs = self.sem_seg_head(features, memory=memory)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("MAPS in training mode needs 'instances' in every input dict")
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            losses = self.criterion(outputs, self.prepare_targets(gt, images))
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        return self.inference(outputs, batched_inputs, images)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def collate_memory(self, batched_inputs: List[Dict]) -> Optional[MemoryTokens]:
        """Pad the retrieved tokens of the batch into one :class:`MemoryTokens`, or None
        when memory is disabled."""
        if not self.memory_enabled:
            return None
        missing = [i for i, x in enumerate(batched_inputs) if "memory" not in x]
        if missing:
            names = [batched_inputs[i].get("file_name", f"#{i}") for i in missing[:3]]
            raise ConfigError(
                f"MODEL.MAPS.ENABLED is True but input(s) {names} carry no 'memory': set "
                "MODEL.MAPS.MEMORY.NEIGHBORS (and MEMORY.BANK) so the data loader attaches "
                "retrieved tokens, or set MODEL.MAPS.ENABLED False")
        return MemoryTokens.collate([x["memory"] for x in batched_inputs]).to(self.device)

    @staticmethod
    def prepare_targets(targets: List[Instances], images: ImageList) -> List[Dict[str, Tensor]]:
        """Ground truth as the criterion wants it: masks zero-padded to the batch's size."""
        h_pad, w_pad = images.tensor.shape[-2:]
        new_targets = []
        for per_image in targets:
            gt_masks = per_image.gt_masks
            if not isinstance(gt_masks, Tensor):  # BitMasks
                gt_masks = gt_masks.tensor
            padded = gt_masks.new_zeros((gt_masks.shape[0], h_pad, w_pad))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            new_targets.append({"labels": per_image.gt_classes, "masks": padded})
        return new_targets

    # --- inference ----------------------------------------------------------------------
    def _thing_ids(self) -> set:
        """Contiguous ids of the thing classes of the training dataset."""
        mapping = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping is None:
            name = getattr(self.metadata, "name", None)
            raise ConfigError(
                f"panoptic/instance inference needs thing classes, but DATASETS.TRAIN[0] "
                f"({name!r}) has no 'thing_dataset_id_to_contiguous_id' metadata; register the "
                "dataset (import maps.data) or set MODEL.MASK_FORMER.TEST.PANOPTIC_ON False")
        return set(int(v) for v in mapping.values())

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        thing_ids = self._thing_ids() if self.panoptic_on else None
        results = []
        for mask_cls, mask_pred, inputs, image_size in zip(
                mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            result: Dict = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
                mask_cls = mask_cls.to(mask_pred)
            if self.semantic_on:
                r = semantic_inference(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    r = sem_seg_postprocess(r, image_size, height, width)
                result["sem_seg"] = r
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    mask_cls, mask_pred, num_classes=self.num_classes, thing_ids=thing_ids,
                    object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold)
            if self.instance_on:
                result["instances"] = instance_inference(
                    mask_cls, mask_pred, num_classes=self.num_classes,
                    topk=self.test_topk_per_image, thing_ids=thing_ids)
            results.append(result)
        return results
