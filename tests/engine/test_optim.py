"""Mask2Former's optimizer recipe (maps.engine.optim): per-parameter learning rates and
weight decays, full-model gradient clipping and WarmupPolyLR, checked against hand-computed
values on modules small enough to reason about."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maps.config import get_maps_cfg
from maps.engine.optim import build_lr_scheduler, build_optimizer, param_groups
from maps.errors import ConfigError


class _Toy(nn.Module):
    """Names as in the real model: ``backbone.*``, ``...memory_fusion...``, a head with a
    LayerNorm and an Embedding (the queries), a frozen and a shared parameter."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Module()
        self.head.memory_fusion = nn.Linear(4, 4, bias=False)
        self.head.proj = nn.Linear(4, 4, bias=False)
        self.head.norm = nn.LayerNorm(4)
        self.head.query_embed = nn.Embedding(5, 4)
        self.head.frozen = nn.Linear(4, 4, bias=False)
        self.head.frozen.weight.requires_grad_(False)
        self.head.tied = self.head.proj  # the same module twice: one group only


def _cfg(**solver):
    cfg = get_maps_cfg()
    cfg.SOLVER.BASE_LR = 0.5
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.MEMORY_MULTIPLIER = 2.0
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _by_param(model, groups):
    """Parameter name -> (lr, weight decay) of its group (one group per parameter from
    param_groups, several per group in the optimizer, which merges equal groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
            out[names[id(p)]] = (g["lr"], g["weight_decay"])
    return out


def test_param_groups_multipliers_and_decay_exemptions():
    model = _Toy()
    got = _by_param(model, param_groups(_cfg(), model))
    assert got == {
        "backbone.0.weight": (pytest.approx(0.05), 0.05),       # 0.5 x backbone 0.1
        "backbone.1.weight": (pytest.approx(0.05), 0.0),        # BN: no decay
        "backbone.1.bias": (pytest.approx(0.05), 0.0),
        "head.memory_fusion.weight": (pytest.approx(1.0), 0.05),  # 0.5 x memory 2.0
        "head.proj.weight": (0.5, 0.05),
        "head.norm.weight": (0.5, 0.0),                          # LayerNorm: no decay
        "head.norm.bias": (0.5, 0.0),
        "head.query_embed.weight": (0.5, 0.0),                   # Embedding: WEIGHT_DECAY_EMBED
    }  # frozen weight absent, tied weight once


def test_param_groups_on_the_tiny_maps_model():
    """On the real model: every parameter of MAPS's memory layers gets MEMORY_MULTIPLIER, the
    backbone BACKBONE_MULTIPLIER, and each trainable parameter is in exactly one group."""
    from maps.modeling.build import build_model, load_config

    cfg = load_config("experiments/configs/synthetic/maps_tiny.yaml", freeze=False)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MEMORY_MULTIPLIER = 1e-3, 3.0
    model = build_model(cfg)
    got = _by_param(model, param_groups(cfg, model))
    assert len(got) == sum(1 for p in model.parameters() if p.requires_grad)
    memory = [n for n in got if "memory_fusion" in n]
    backbone = [n for n in got if n.startswith("backbone.")]
    assert memory and backbone
    assert [got[n][0] for n in memory] == pytest.approx([3e-3] * len(memory))
    assert [got[n][0] for n in backbone] == pytest.approx([1e-4] * len(backbone))
    assert got["sem_seg_head.predictor.query_feat.weight"] == (pytest.approx(1e-3), 0.0)


def _two_param_model(g1, g2):
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(2))
    model.b = nn.Parameter(torch.zeros(2))
    model.a.grad = torch.tensor(g1)
    model.b.grad = torch.tensor(g2)
    return model


def _sgd_clip_cfg(clip_type="full_model", value=1.0):
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, BASE_LR=1.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def test_full_model_clipping_scales_the_global_norm():
    # grads (3, 0) and (0, 4) in two groups: global norm 5 -> both scaled by 1/5.
    # (detectron2's per-group "norm" clipping would give (1, 0) and (0, 1) instead.)
    model = _two_param_model([3.0, 0.0], [0.0, 4.0])
    opt = build_optimizer(_sgd_clip_cfg(), model)
    assert len(opt.param_groups) == 1  # equal hyperparameters: merged into one group
    opt.step()
    torch.testing.assert_close(model.a.detach(), torch.tensor([-0.6, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.b.detach(), torch.tensor([0.0, -0.8]), atol=1e-5, rtol=0)


def test_full_model_clipping_leaves_small_gradients_alone():
    model = _two_param_model([0.3, 0.0], [0.0, 0.4])  # norm 0.5 < 1
    build_optimizer(_sgd_clip_cfg(), model).step()
    torch.testing.assert_close(model.a.detach(), torch.tensor([-0.3, 0.0]))
    torch.testing.assert_close(model.b.detach(), torch.tensor([0.0, -0.4]))


def test_per_group_clipping_when_not_full_model():
    """CLIP_TYPE "norm" keeps detectron2's per-parameter clipping: each group to norm 1."""
    model = _two_param_model([3.0, 0.0], [0.0, 4.0])
    build_optimizer(_sgd_clip_cfg("norm"), model).step()
    torch.testing.assert_close(model.a.detach(), torch.tensor([-1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.b.detach(), torch.tensor([0.0, -1.0]), atol=1e-5, rtol=0)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="SOLVER.OPTIMIZER.*'LION'"):
        build_optimizer(_cfg(OPTIMIZER="LION"), _Toy())


def _lrs(cfg, steps):
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _poly_cfg(**kw):
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupPolyLR", BASE_LR=0.1, MAX_ITER=100, POLY_LR_POWER=0.9,
               WARMUP_ITERS=10, WARMUP_FACTOR=0.01, WARMUP_METHOD="linear")
    for k, v in kw.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_warmup_poly_lr_follows_the_formula():
    base, M, W, f, p = 0.1, 100, 10, 0.01, 0.9
    lrs = _lrs(_poly_cfg(), M)
    # after warmup: base * (1 - t / M) ** p
    for t in (10, 11, 50, 75, 99):
        assert lrs[t] == pytest.approx(base * (1 - t / M) ** p, rel=1e-9), t
    # warmup (detectron2's WarmupParamScheduler): linear from f * base to the poly value at W
    end = base * (1 - W / M) ** p
    for t in range(W):
        assert lrs[t] == pytest.approx(f * base + (t / W) * (end - f * base), rel=1e-9), t
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[50] == pytest.approx(0.1 * 0.5 ** 0.9)  # 0.05359...
    assert all(b < a for a, b in zip(lrs[W:], lrs[W + 1:]))


def test_warmup_poly_lr_constant_ending():
    lrs = _lrs(_poly_cfg(POLY_LR_CONSTANT_ENDING=0.2, WARMUP_ITERS=0), 100)
    # (1 - t/100) ** 0.9 falls below 0.2 once 1 - t/100 < 0.2 ** (1 / 0.9) = 0.1672...
    cross = math.ceil(100 * (1 - 0.2 ** (1 / 0.9)))
    assert lrs[cross - 1] > 0.02 and lrs[cross] == pytest.approx(0.02)
    assert lrs[99] == pytest.approx(0.02)


def test_other_schedulers_are_detectron2s():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", BASE_LR=0.1, MAX_ITER=20, STEPS=(10,),
               GAMMA=0.1, WARMUP_ITERS=0)
    lrs = _lrs(cfg, 20)
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01)


def test_schedule_keeps_the_group_multipliers():
    model = _Toy()
    cfg = _poly_cfg(WARMUP_ITERS=0)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    for _ in range(50):
        opt.step()
        sched.step()
    lrs = {n: lr for n, (lr, _) in _by_param(model, opt.param_groups).items()}
    factor = 0.5 ** 0.9
    assert lrs["head.proj.weight"] == pytest.approx(0.1 * factor)
    assert lrs["backbone.0.weight"] == pytest.approx(0.01 * factor)
    assert lrs["head.memory_fusion.weight"] == pytest.approx(0.2 * factor)


def test_merged_groups_update_the_tiny_model_bit_for_bit_as_per_parameter_groups():
    """The optimizer merges param_groups' one-parameter groups that share hyperparameters
    (a multi-tensor update per group); the weights after some AdamW steps with full-model
    clipping are exactly those of one group per parameter, as Mask2Former builds it."""
    import copy
    import itertools

    from maps.engine.optim import merge_equal_groups
    from maps.modeling.build import build_model, load_config

    cfg = load_config("experiments/configs/synthetic/maps_tiny.yaml", freeze=False)
    torch.manual_seed(0)
    merged_model = build_model(cfg)
    plain_model = copy.deepcopy(merged_model)
    merged = build_optimizer(cfg, merged_model)
    groups = param_groups(cfg, plain_model)
    assert len(merged.param_groups) == len(merge_equal_groups(groups)) < len(groups)

    class PerParameter(torch.optim.AdamW):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
            return super().step(closure)

    plain = PerParameter(groups, cfg.SOLVER.BASE_LR, foreach=False)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(merged_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        merged.step()
        plain.step()
    for (name, a), b in zip(merged_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name
