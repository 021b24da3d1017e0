"""Config loading, model building and parameter counting: the library side of ``maps show``.

Kept apart from the command so the experiment registry (``maps show NAME``), the launcher
and the tests resolve a config exactly the same way, and so every mistake in a config file
or an override becomes one :class:`~maps.errors.ConfigError` naming the file or key.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import CfgNode
from torch import nn

from maps.config import get_maps_cfg, merge_config_file
from maps.errors import ConfigError

__all__ = ["load_config", "build_model", "count_parameters", "MEMORY_PARAM_MARKER"]

# parameters whose qualified name contains this belong to MAPS's memory modules
# (the decoder's ``memory_fusion``; the optimizer's memory multiplier uses the same rule)
MEMORY_PARAM_MARKER = "memory"
EXTRA_SELF_ATTN_MARKER = "extra_self_attention"


def _yacs_message(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(msg).strip()


def load_config(path: Optional[str | os.PathLike] = None, opts: Sequence[str] = (),
                freeze: bool = True) -> CfgNode:
    """The default config with Mask2Former and MAPS keys, then ``path`` (with its
    ``_BASE_`` chain), then ``opts`` (``["KEY", "VALUE", ...]`` as on detectron2's command line).

    Raises:
        ConfigError: the file (or a ``_BASE_``) is missing or not valid YAML, a key does not
            exist, a value has the wrong type, or ``opts`` is not KEY VALUE pairs.
    """
    cfg = get_maps_cfg()
    if path is not None:
        # read as data (safe_load), the _BASE_ chain included: never detectron2's unsafe default
        merge_config_file(cfg, os.fspath(path))
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        raise ConfigError(f"override: {_yacs_message(e)}") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"override: {_yacs_message(e)}") from None
    if freeze:
        cfg.freeze()
    return cfg


def build_model(cfg: CfgNode, device: str | torch.device | None = None) -> nn.Module:
    """``cfg.MODEL.META_ARCHITECTURE`` built on ``device`` (default ``cfg.MODEL.DEVICE``),
    with every module of :mod:`maps.modeling` registered. No weights are loaded."""
    import maps.modeling  # noqa: F401  (registers backbones, heads and the meta-architecture)
    from detectron2.modeling import META_ARCH_REGISTRY

    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        known = sorted(k for k, _ in META_ARCH_REGISTRY)
        raise ConfigError(f"MODEL.META_ARCHITECTURE {name!r} is not registered; known: {known}")
    model = META_ARCH_REGISTRY.get(name)(cfg)
    return model.to(torch.device(device if device is not None else cfg.MODEL.DEVICE))


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Parameter counts: total, trainable, and the shares of the backbone, pixel decoder,
    transformer decoder, MAPS memory modules and Table 4's extra self-attention layers.

    Shared tensors are counted once; the memory and extra shares are also inside
    ``transformer_decoder``.
    """
    counts = {"total": 0, "trainable": 0, "backbone": 0, "pixel_decoder": 0,
              "transformer_decoder": 0, "memory": 0, "extra_self_attention": 0}
    for name, p in model.named_parameters():  # named_parameters() skips shared duplicates
        n = p.numel()
        counts["total"] += n
        if p.requires_grad:
            counts["trainable"] += n
        if name.startswith("backbone."):
            counts["backbone"] += n
        elif ".pixel_decoder." in f".{name}":
            counts["pixel_decoder"] += n
        elif ".predictor." in f".{name}":
            counts["transformer_decoder"] += n
        if MEMORY_PARAM_MARKER in name:
            counts["memory"] += n
        if EXTRA_SELF_ATTN_MARKER in name:
            counts["extra_self_attention"] += n
    return counts
