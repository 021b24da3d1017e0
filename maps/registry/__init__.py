"""The registry of named experiments: one entry for every row of every paper table.

Owns: ``experiments/*.yaml`` -> validated :class:`Experiment` objects (``experiments``: the
data model, configs and overrides; ``schema``: parsing the files; ``checks``: building every
runnable config before anything launches; ``loader``: where the files are and loading them).
May import: ``maps.errors``, ``maps.io``, ``maps.config`` and, lazily, ``maps.modeling``
(to build configs). Nothing here imports launch, sweep, report or the commands.
"""
from maps.registry.experiments import (
    CONFIDENCE,
    DENSE_EXTRACTORS,
    EVAL_ONLY_PREFIXES,
    KEY_ENCODERS,
    METRICS,
    SUITES,
    TABLES,
    Experiment,
    Registry,
    TableInfo,
    apply_overrides,
    check_maps_values,
    expand_grid,
)
from maps.registry.loader import default_root, load_registry, resolve_show_target, shipped_dir

__all__ = [
    "CONFIDENCE", "DENSE_EXTRACTORS", "EVAL_ONLY_PREFIXES", "KEY_ENCODERS", "METRICS", "SUITES",
    "TABLES", "Experiment", "Registry", "TableInfo", "apply_overrides", "check_maps_values",
    "expand_grid", "default_root", "load_registry", "resolve_show_target", "shipped_dir",
]
