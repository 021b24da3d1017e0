"""A narrow ResNet for the CPU configurations.

detectron2's ``build_resnet_backbone`` insists on 64 res2 channels for R18/R34 (the
ImageNet widths). The tiny configuration wants the same ResNet-18 topology (BasicStem,
2-2-2-2 BasicBlocks, strides 4-32) at a fraction of the width, so it trains at several
iterations per second on two cores; this builder is detectron2's own minus that check.
"""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

from maps.errors import ConfigError

__all__ = ["build_small_resnet_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@BACKBONE_REGISTRY.register()
def build_small_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 of BasicBlocks with any width: stem ``RESNETS.STEM_OUT_CHANNELS``, res2
    ``RESNETS.RES2_OUT_CHANNELS``, doubling at each later stage."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ConfigError(
            f"MODEL.RESNETS.DEPTH {r.DEPTH} is not supported by build_small_resnet_backbone "
            f"(BasicBlock ResNets: {sorted(_BLOCKS_PER_STAGE)}); use build_resnet_backbone")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS,
                     norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            block_class=BasicBlock,
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=r.NORM,
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
