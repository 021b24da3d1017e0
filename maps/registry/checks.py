"""The config-level checks of a registry: every runnable experiment's config is built once.

Run by :func:`maps.registry.load_registry` (``validate=True``) so that nothing is launched
from a registry that would fail minutes into a Slurm job: unknown detectron2 keys and
wrongly typed values (detectron2/yacs refuse them while merging), out-of-range MAPS values
(:func:`maps.registry.check_maps_values`), unregistered datasets, and aliases whose declared
setup is not their target's.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Set, Tuple

from maps.errors import ConfigError
from maps.registry.experiments import Experiment, Registry, check_maps_values


def check_registry(registry: Registry) -> None:
    """Raise the first problem of ``registry`` as a ConfigError naming file, entry and key."""
    registered = registered_datasets()
    configs: Dict[str, Any] = {}
    for e in registry:
        if not e.runnable or e.is_alias:
            continue
        cfg = e.build_config()
        configs[e.name] = cfg
        where = f"{e.source}: entry '{e.name}'"
        for key, problem in check_maps_values(cfg):
            raise ConfigError(f"{where}: key '{key}': {problem}")
        _check_datasets(e, cfg, registered, where)
    for name, declared in registry.alias_setups.items():
        alias = registry.get(name)
        where = f"{alias.source}: entry '{name}'"
        if declared.base_config is None or declared.iterations is None:
            raise ConfigError(f"{where}: an alias that declares its own setup needs base and "
                              "iterations (here or in the file's defaults) to be compared with "
                              f"'{alias.same_as}'")
        mine = declared.build_config()
        theirs = configs.get(alias.same_as) or registry.get(alias.same_as).build_config()
        for key, a, b in _differences(mine, theirs):
            raise ConfigError(f"{where}: key '{key}': same_as '{alias.same_as}' but its config "
                              f"differs ({a!r} here, {b!r} there); make it its own run or drop "
                              "the setup")


def registered_datasets() -> Set[str]:
    """Names in detectron2's DatasetCatalog after the project's datasets are registered."""
    import detectron2.data.datasets  # noqa: F401  (detectron2's builtin registrations)
    from detectron2.data import DatasetCatalog

    try:
        import maps.data  # noqa: F401  (registers synthetic, COCO, ADE20K, Cityscapes panoptic)
    except ModuleNotFoundError as e:
        if e.name not in ("maps.data",):
            raise
    return set(DatasetCatalog.list())


def _check_datasets(e: Experiment, cfg: Any, registered: Set[str], where: str) -> None:
    for split, key in (("train", "DATASETS.TRAIN"), ("test", "DATASETS.TEST")):
        names = list(cfg.DATASETS[split.upper()])
        if not names:
            raise ConfigError(f"{where}: key 'datasets.{split}': no {split} dataset (neither the "
                              f"entry nor its base config sets {key})")
        for name in names:
            if name not in registered:
                raise ConfigError(f"{where}: key 'datasets.{split}': dataset '{name}' is not "
                                  "registered in detectron2's DatasetCatalog (import maps.data "
                                  "registers the project's datasets)")
    enabled = bool(cfg.MODEL.MAPS.ENABLED)
    if enabled and e.memory_dataset is None:
        raise ConfigError(f"{where}: missing key 'memory_dataset' (MODEL.MAPS.ENABLED is true: "
                          "the memory bank must be built from a dataset)")
    if not enabled and e.memory_dataset is not None:
        raise ConfigError(f"{where}: key 'memory_dataset': memory is off (MODEL.MAPS.ENABLED is "
                          "false), so no memory dataset should be set")
    if e.memory_dataset is not None and e.memory_dataset not in registered:
        raise ConfigError(f"{where}: key 'memory_dataset': dataset '{e.memory_dataset}' is not "
                          "registered in detectron2's DatasetCatalog")


def _flatten(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for key in sorted(node.keys()):
        value = node[key]
        full = f"{prefix}{key}"
        if hasattr(value, "keys"):
            yield from _flatten(value, full + ".")
        else:
            yield full, value


def _differences(a: Any, b: Any) -> List[Tuple[str, Any, Any]]:
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    keys = sorted(set(fa) | set(fb))
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return [(k, fa.get(k), fb.get(k)) for k in keys if norm(fa.get(k)) != norm(fb.get(k))]
