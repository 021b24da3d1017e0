"""Mask2Former's optimizer: per-parameter groups and full-model gradient clipping."""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, List, Optional, Set

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

_NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d, torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
)


def param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """One group per parameter, as Mask2Former: the backbone's learning rate scaled by
    SOLVER.BACKBONE_MULTIPLIER, memory layers' by SOLVER.MEMORY_MULTIPLIER, and no weight
    decay on norms (WEIGHT_DECAY_NORM) or embeddings (WEIGHT_DECAY_EMBED)."""
    defaults = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
    groups: List[Dict[str, Any]] = []
    seen: Set[torch.nn.Parameter] = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            hp = copy.copy(defaults)
            if "backbone" in module_name:
                hp["lr"] *= cfg.SOLVER.BACKBONE_MULTIPLIER
            if "memory" in module_name or "memory" in param_name:
                hp["lr"] *= cfg.SOLVER.MEMORY_MULTIPLIER
            if isinstance(module, _NORM_TYPES):
                hp["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                hp["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [value], **hp})
    return groups


#: multi-tensor (``foreach``) optimizer updates, one call per merged group; None is PyTorch's
#: default (per-parameter loops on the CPU), which benchmarks/train_step_profile.py compares
FOREACH: Optional[bool] = True


def merge_equal_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Parameters whose hyperparameters are all equal in one group, in first-seen order.

    :func:`param_groups` gives one group per parameter (Mask2Former's code, and easy to read
    and test); the optimizer updates the merged groups with one multi-tensor (``foreach``)
    call per group instead of ~300 per-parameter calls. The update is the same, bit for bit:
    AdamW and SGD act element-wise with each group's own hyperparameters.
    """
    merged: Dict[tuple, Dict[str, Any]] = {}
    for group in groups:
        hp = {k: v for k, v in group.items() if k != "params"}
        key = tuple(sorted(hp.items()))
        if key not in merged:
            merged[key] = {"params": [], **hp}
        merged[key]["params"].extend(group["params"])
    return list(merged.values())


def _with_full_model_clipping(optim_cls, clip_norm: float):
    """Subclass ``optim_cls`` so that ``step`` clips the norm of all gradients together
    (Mask2Former's CLIP_TYPE "full_model"; detectron2's own clipping is per group)."""

    class FullModelGradientClippingOptimizer(optim_cls):
        #: the parameters in the order of :func:`param_groups` (the model's): the global norm
        #: is a sum whose rounding depends on the order, and merged groups reorder them
        clip_params: Optional[List[torch.nn.Parameter]] = None

        def step(self, closure=None):
            params = self.clip_params or itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        from maps.errors import ConfigError

        raise ConfigError(f"SOLVER.OPTIMIZER: unknown optimizer {cfg.SOLVER.OPTIMIZER!r} "
                          "(expected ADAMW or SGD)")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0
    if full_model:
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE)
    groups = param_groups(cfg, model)
    optimizer = optim_cls(merge_equal_groups(groups), cfg.SOLVER.BASE_LR, foreach=FOREACH, **kwargs)
    if full_model:
        optimizer.clip_params = [p for g in groups for p in g["params"]]
    else:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """detectron2's schedulers plus Mask2Former's WarmupPolyLR (the Cityscapes recipe):
    ``lr = base_lr * max((1 - iter / max_iter) ** POLY_LR_POWER, POLY_LR_CONSTANT_ENDING)``
    after detectron2's warmup."""
    from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
    from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
    from fvcore.common.param_scheduler import ParamScheduler

    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)

    power, ending = cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.POLY_LR_CONSTANT_ENDING

    class _Poly(ParamScheduler):
        def __call__(self, where: float) -> float:
            return max((1.0 - where) ** power, ending)

    sched = WarmupParamScheduler(
        _Poly(), cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0), cfg.SOLVER.WARMUP_METHOD,
        cfg.SOLVER.RESCALE_INTERVAL)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
