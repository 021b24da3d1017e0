"""The narrow ResNet of the CPU configurations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from maps.errors import ConfigError
from maps.modeling import load_config
from maps.modeling.backbone import build_small_resnet_backbone

TINY = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "synthetic" / "tiny.yaml"


def test_small_resnet_has_resnet18_topology_at_the_configured_width():
    cfg = load_config(TINY)
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)}
    assert [len(getattr(backbone, f"res{i}")) for i in range(2, 6)] == [2, 2, 2, 2]
    out = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 16, 16, 24), "res3": (1, 32, 8, 12), "res4": (1, 64, 4, 6),
        "res5": (1, 128, 2, 3)}


def test_small_resnet_rejects_bottleneck_depths():
    cfg = load_config(TINY, ["MODEL.RESNETS.DEPTH", "50"])
    with pytest.raises(ConfigError, match="MODEL.RESNETS.DEPTH 50"):
        build_small_resnet_backbone(cfg, ShapeSpec(channels=3))
