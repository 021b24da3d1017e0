"""Heavier model checks (``pytest -m slow``): the paper's R50 model runs end to end on the
CPU, and the tiny model can fit a batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_meta_arch import (  # same folder (pytest prepends it to sys.path)
    AUX_LOSSES,
    _inputs,
)

import maps.data  # noqa: F401  (metadata of the training datasets)
from maps.modeling import build_model, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
pytestmark = pytest.mark.slow


def test_r50_maps_model_trains_and_infers_on_cpu():
    cfg = load_config(CONFIGS / "coco/maps_R50_bs16_50ep.yaml",
                      ["MODEL.DEVICE", "cpu", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model(_inputs([(128, 160)], memory_objects=[6], memory_dim=512))
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"} | AUX_LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (r,) = model(_inputs([(128, 160)], memory_objects=[6], with_instances=False, memory_dim=512))
    assert r["sem_seg"].shape == (133, 128, 160)
    assert r["panoptic_seg"][0].shape == (128, 160)


def test_tiny_model_fits_one_batch():
    cfg = load_config(CONFIGS / "synthetic/maps_tiny.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = _inputs([(64, 64), (64, 64)], memory_objects=[3, 5])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.7 * sum(history[:3]) / 3, history
