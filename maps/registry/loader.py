"""Loading the registry: find the experiments folder, parse its files, check what they build."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from maps.errors import ConfigError
from maps.registry.experiments import Registry, _load_base, apply_overrides

if TYPE_CHECKING:
    from detectron2.config import CfgNode

# ----------------------------------------------------------------------------------------------
def shipped_dir(env_var: str, name: str) -> Path:
    """``$<env_var>`` if set, else ``./<name>`` if it exists, else ``<name>`` shipped beside
    the package (the experiments and sweeps folders of this repository)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    local = Path(name)
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / name


def default_root() -> Path:
    """``$MAPS_EXPERIMENTS``, else ``./experiments``, else the registry shipped beside the package."""
    return shipped_dir("MAPS_EXPERIMENTS", "experiments")


def load_registry(root: Optional[os.PathLike] = None, validate: bool = True) -> Registry:
    """Read and validate every registry file under ``root`` (default :func:`default_root`).

    Schema, names, references (``same_as``, ``eval_of``, ``mirrors``) and base-config paths are
    always checked. With ``validate`` (the default) every runnable experiment's config is also
    built: unknown detectron2 keys, values of the wrong type or out of range, layer indices
    outside the decoder, aliases whose setup differs from their target's, and datasets that
    are not registered are refused. ``validate=False`` skips that (fast, no torch import).
    """
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise ConfigError(f"experiment registry folder not found: {root}")
    from maps.registry.schema import parse_registry_files

    experiments, tables, alias_setups = parse_registry_files(root)
    registry = Registry(experiments, tables, root, alias_setups)
    if validate:
        from maps.registry.checks import check_registry

        check_registry(registry)
    return registry


def resolve_show_target(name: Optional[str], config_path: Optional[os.PathLike],
                        opts: Sequence[str] = (), root: Optional[os.PathLike] = None,
                        seed: Optional[int] = None) -> "CfgNode":
    """The config ``maps show`` prints: a registry experiment by name, or a config file.

    Exactly one of ``name`` and ``config_path``. ``opts`` are detectron2 ``KEY VALUE`` pairs
    applied last (to either). A config file is read with ``maps.modeling.build.load_config``
    when that exists (the model's own loader), else with the MAPS defaults plus the file.
    """
    if (name is None) == (config_path is None):
        raise ConfigError("give either an experiment NAME or --config FILE (exactly one)")
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    if name is not None:
        cfg = load_registry(root).get(name).build_config(seed)
        where = f"experiment '{name}' (command-line overrides)"
    else:
        path = Path(config_path)
        try:
            from maps.modeling.build import load_config
        except ImportError:
            load_config = None
        if load_config is not None:
            cfg = load_config(str(path), opts, freeze=False)
            if seed is not None:
                cfg.SEED = int(seed)
            return cfg
        cfg = _load_base(path, f"--config {path}")
        where = f"--config {path} (command-line overrides)"
        if seed is not None:
            cfg.SEED = int(seed)
    from yacs.config import CfgNode as _CN

    apply_overrides(cfg, {k: _CN._decode_cfg_value(v) if isinstance(v, str) else v
                          for k, v in zip(opts[0::2], opts[1::2])}, where)
    return cfg
