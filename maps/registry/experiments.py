"""The registry of named experiments: the paper's tables as runnable, checkable entries.

``experiments/`` holds one YAML file per paper table (``table1.yaml`` ... ``table8.yaml``) and a
second suite, ``experiments/synthetic/*.yaml``, that mirrors the main-results table (Table 2)
and the ablations (Tables 4-8) on the synthetic dataset with the tiny CPU configuration.
``experiments/configs/`` holds the base detectron2 configs the entries start from; it is not
part of the registry.

A file looks like::

    table: 5                 # the paper table the file mirrors (1-8)
    suite: paper             # paper | synthetic
    title: Ablation of augmentation strategies on ADE20K
    columns: [PQ, AP, mIoU]  # the table's metric columns, in print order
    defaults:                # applied to every runnable entry of the file
      base: ade20k/maps_R50_bs16_160k.yaml     # relative to experiments/configs/
      iterations: 160000
      seeds: 1
      datasets: {train: [ade20k_panoptic_train], test: [ade20k_panoptic_val]}
    entries:
      - name: ade20k/table5/none
        row: None            # the row's label as printed in the paper
        same_as: ade20k/maps # the same run as another entry: trained once, shown in both tables
        paper: {PQ: 40.7, AP: 27.0, mIoU: 47.0}
      - name: ade20k/table5/swapped
        row: Swapped
        overrides: {MODEL.MAPS.SWAPPED: true}
        paper: {PQ: 39.6, AP: 26.9, mIoU: 46.9}

Entries are runnable experiments (Mask2Former or MAPS variants: a base config, detectron2
overrides, iterations, seeds, datasets) or reference rows of other methods (``runnable:
false``), which only carry the paper's numbers. ``same_as`` makes one run serve several
tables' rows; ``eval_of`` evaluates another entry's trained model with test-time overrides
(Table 7); ``grid`` expands an entry into one experiment per combination of values (Table 8).

Everything is validated by :func:`load_registry` before anything can be launched: a broken
registry raises one :class:`maps.errors.ConfigError` naming the file, the entry and the key.
Only :func:`yaml.safe_load` reads these files.
"""
from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple


from maps.config import DENSE_EXTRACTORS, KEY_ENCODERS, check_maps_values  # noqa: F401  (re-exported)
from maps.errors import ConfigError

if TYPE_CHECKING:  # detectron2 imports torch: keep it out of `maps --help`
    from detectron2.config import CfgNode

__all__ = [
    "Experiment",
    "Registry",
    "TableInfo",
    "check_maps_values",
    "SUITES",
    "TABLES",
    "METRICS",
]

SUITES = ("paper", "synthetic")
TABLES = tuple(range(1, 9))
#: the paper's metric columns; ``params`` in millions, ``iters`` in iterations
METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU", "params", "iters")
CONFIDENCE = ("high", "medium", "low")
#: config keys an ``eval_of`` entry may change: test-time behaviour only, never training
EVAL_ONLY_PREFIXES = ("MODEL.MAPS.TEST.", "MODEL.MASK_FORMER.TEST.", "TEST.", "DATASETS.TEST")

_SETUP_KEYS = {"base", "overrides", "iterations", "seeds", "datasets", "memory_dataset"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]*(/[a-z0-9][a-z0-9._+-]*)+$")
_TABLE_SELECTOR_RE = re.compile(r"^(?:(?P<suite>[a-z]+)/)?(?:table)?(?P<table>\d+)$")


# ----------------------------------------------------------------------------------------------
# data model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableInfo:
    """One paper table of one suite, as declared by a registry file."""

    number: int
    suite: str
    title: str
    columns: Tuple[str, ...]
    source: Path
    notes: str = ""


@dataclass(frozen=True)
class Experiment:
    """A named row of a paper table: a runnable experiment, an alias of one, or a reference.

    Aliases (``same_as``) and evaluations (``eval_of``) are resolved at load time: their
    ``base_config``, ``overrides``, ``iterations``, ``datasets`` and ``seeds`` are those of the
    run that produces their numbers, so :meth:`build_config` needs no registry. Treat the dict
    fields as read-only.
    """

    name: str
    suite: str
    table: int
    row: str
    runnable: bool
    base_config: Optional[Path]
    overrides: Dict[str, Any]
    iterations: Optional[int]
    seeds: Tuple[int, ...]
    datasets: Dict[str, Tuple[str, ...]]
    paper: Dict[str, float]
    reconstructed: Dict[str, str]
    same_as: Optional[str]
    notes: str
    source: Path
    #: the entry whose trained model this one only evaluates (Table 7)
    eval_of: Optional[str] = None
    #: for the synthetic suite: the paper entry whose row this one mirrors
    mirrors: Optional[str] = None
    #: the dataset the memory bank is built from (None when memory is off)
    memory_dataset: Optional[str] = None
    #: how sure the transcription/reconstruction of this row is, when it is not plain
    confidence: Optional[str] = None
    #: non-metric cells of the printed row (backbone, check marks, ...)
    cells: Dict[str, Any] = field(default_factory=dict)
    #: override values that are our choice, not the paper's: key -> why
    our_choices: Dict[str, str] = field(default_factory=dict)
    #: for entries expanded from a grid: the grid's key -> value of this point
    grid_point: Dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # dict fields are unhashable; names are unique in a registry
        return hash((self.name, self.suite))

    @property
    def canonical_name(self) -> str:
        """The experiment whose run produces this row's numbers (itself unless an alias)."""
        return self.same_as or self.name

    @property
    def is_alias(self) -> bool:
        return self.same_as is not None

    def run_name(self, seed: int) -> str:
        """The run of this row for ``seed``: ``<canonical experiment>/seed<seed>``.

        Aliases share the run of their target, so a launch over several tables trains each
        distinct setup once; the run store keeps runs at ``<runs root>/<run_name>``.
        """
        if not self.runnable:
            raise ConfigError(f"{self.source}: entry '{self.name}' is a reference row of the "
                              "paper (runnable: false); it has no runs")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"entry '{self.name}': seed must be an integer >= 0, got {seed!r}")
        return f"{self.canonical_name}/seed{seed}"

    def train_run_name(self, seed: int) -> str:
        """The run whose training produced the model this row reports: for an ``eval_of``
        entry, the evaluated experiment's run (load its final checkpoint); else
        :meth:`run_name`."""
        if self.eval_of is not None:
            self.run_name(seed)  # same checks
            return f"{self.eval_of}/seed{seed}"
        return self.run_name(seed)

    def build_config(self, seed: Optional[int] = None) -> "CfgNode":
        """The resolved detectron2 config: base + MAPS keys + overrides + iterations + datasets.

        ``SOLVER.MAX_ITER`` is set to :attr:`iterations`; when that differs from the base's,
        ``SOLVER.STEPS`` is scaled by the same factor (unless an override sets it), so a
        shortened schedule keeps its learning-rate drops. ``seed`` sets ``cfg.SEED``. The
        config is returned unfrozen.
        """
        if not self.runnable:
            raise ConfigError(f"{self.source}: entry '{self.name}' is a reference row of the "
                              "paper (runnable: false); it has no config")
        where = f"{self.source}: entry '{self.name}'"
        cfg = _load_base(self.base_config, where)
        apply_overrides(cfg, self.overrides, where)
        _set_iterations(cfg, self.iterations, "SOLVER.STEPS" in self.overrides)
        if self.datasets.get("train"):
            cfg.DATASETS.TRAIN = tuple(self.datasets["train"])
        if self.datasets.get("test"):
            cfg.DATASETS.TEST = tuple(self.datasets["test"])
        if seed is not None:
            cfg.SEED = int(seed)
        return cfg

    def memory_spec(self, cfg: Optional["CfgNode"] = None) -> Optional[Dict[str, Any]]:
        """What this run's memory bank is built from, or None when memory is off.

        Runs with equal specs share one bank and one neighbour cache (a launcher builds each
        distinct spec once, as a prerequisite of the runs that need it). ``cfg`` is this
        experiment's config as the launch resolved it (weights), default its own.
        """
        if not self.runnable:
            return None
        cfg = cfg if cfg is not None else self.build_config()
        if not cfg.MODEL.MAPS.ENABLED:
            return None
        mem = cfg.MODEL.MAPS.MEMORY
        return {"dataset": self.memory_dataset, "key_encoder": mem.KEY_ENCODER,
                "key_arch": mem.KEY_ARCH, "dense": mem.DENSE, "weights": mem.WEIGHTS,
                "dense_arch": mem.DENSE_ARCH, "dense_weights": mem.DENSE_WEIGHTS,
                "index": mem.INDEX, "seed": int(mem.SEED),
                "query_datasets": list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)}

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready description (what ``maps list --json`` prints)."""
        return {
            "name": self.name,
            "suite": self.suite,
            "table": self.table,
            "row": self.row,
            "runnable": self.runnable,
            "same_as": self.same_as,
            "eval_of": self.eval_of,
            "mirrors": self.mirrors,
            "paper": dict(self.paper),
            "reconstructed": dict(self.reconstructed),
            "confidence": self.confidence,
            "cells": dict(self.cells),
            "base_config": str(self.base_config) if self.base_config else None,
            "overrides": dict(self.overrides),
            "our_choices": dict(self.our_choices),
            "iterations": self.iterations,
            "seeds": list(self.seeds),
            "datasets": {k: list(v) for k, v in self.datasets.items()},
            "memory_dataset": self.memory_dataset,
            "notes": self.notes,
            "source": str(self.source),
        }


class Registry:
    """The validated set of experiments, in file order (table 1 first, then by file)."""

    def __init__(self, experiments: Sequence[Experiment], tables: Sequence[TableInfo],
                 root: Path, alias_setups: Optional[Mapping[str, Experiment]] = None) -> None:
        self.root = root
        #: aliases that declare a setup of their own, as declared (checked against the target)
        self.alias_setups: Dict[str, Experiment] = dict(alias_setups or {})
        self.tables: Tuple[TableInfo, ...] = tuple(tables)
        self._experiments: Dict[str, Experiment] = {e.name: e for e in experiments}

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._experiments.values())

    def __len__(self) -> int:
        return len(self._experiments)

    def __contains__(self, name: object) -> bool:
        return name in self._experiments

    def get(self, name: str) -> Experiment:
        """The experiment called ``name`` (a ConfigError suggesting close names otherwise)."""
        try:
            return self._experiments[name]
        except KeyError:
            raise ConfigError(f"no experiment named '{name}' in {self.root}"
                              f"{_suggest(name, self._experiments)}") from None

    def table(self, number: int, suite: str = "paper") -> TableInfo:
        for t in self.tables:
            if t.number == number and t.suite == suite:
                return t
        raise ConfigError(f"no table {number} in suite '{suite}' of {self.root}")

    def select(self, selector: str, suite: Optional[str] = None) -> List[Experiment]:
        """Experiments matching ``selector``, in registry order.

        ``selector`` is an experiment name (``ade20k/maps``), a table (``table6`` or ``6``:
        the paper's Table 6, or the suite ``suite`` names; ``paper/table6``,
        ``synthetic/table6``: that suite's), a name prefix (``ade20k/table5``), or a glob
        (``ade20k/*``, ``*/maps-aug*``). Several selectors can be joined with commas.
        ``suite`` keeps only that suite. A bare table never means the synthetic mirror unless
        asked: ``maps launch table6`` on a GPU partition must not train the CPU mirror's rows.
        """
        if suite is not None and suite not in SUITES:
            raise ConfigError(f"unknown suite '{suite}' (expected one of {', '.join(SUITES)})")
        chosen: Dict[str, Experiment] = {}
        for part in (p.strip() for p in selector.split(",")):
            if not part:
                continue
            for e in self._select_one(part, suite):
                chosen.setdefault(e.name, e)
        order = {name: i for i, name in enumerate(self._experiments)}
        out = sorted(chosen.values(), key=lambda e: order[e.name])
        if suite is not None:
            out = [e for e in out if e.suite == suite]
        if not out:
            raise ConfigError(f"no experiment matches '{selector}'"
                              + (f" in suite '{suite}'" if suite else "")
                              + _suggest(selector, self._experiments))
        return out

    def _select_one(self, part: str, suite: Optional[str] = None) -> List[Experiment]:
        if part in self._experiments:
            return [self._experiments[part]]
        m = _TABLE_SELECTOR_RE.match(part)
        if m and (m.group("suite") is None or m.group("suite") in SUITES):
            table, suite = int(m.group("table")), m.group("suite") or suite or "paper"
            if table not in TABLES:
                raise ConfigError(f"unknown table {table} in selector '{part}' "
                                  f"(the paper has tables {TABLES[0]}-{TABLES[-1]})")
            return [e for e in self if e.table == table and e.suite == suite]
        if any(c in part for c in "*?["):
            return [e for e in self if fnmatch.fnmatchcase(e.name, part)]
        prefix = part.rstrip("/") + "/"
        return [e for e in self if e.name.startswith(prefix)]

    def runs(self, selector: str, suite: Optional[str] = None) -> List[Experiment]:
        """The distinct runnable experiments behind a selection: what a launch must run.

        Reference rows are dropped, aliases are replaced by their targets (each setup once),
        and the training an ``eval_of`` entry evaluates comes before the evaluation.
        """
        out: Dict[str, Experiment] = {}
        for e in self.select(selector, suite):
            if not e.runnable:
                continue
            e = self._experiments[e.canonical_name]
            if e.eval_of is not None:
                out.setdefault(e.eval_of, self._experiments[e.eval_of])
            out.setdefault(e.name, e)
        return list(out.values())


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
#: base configs already merged, by (path, mtime): a registry builds dozens from a handful of files
_BASE_CACHE: Dict[Tuple[str, int], "CfgNode"] = {}


def _load_base(path: Optional[Path], where: str) -> "CfgNode":
    from maps.config import get_maps_cfg, merge_config_file

    if path is None:
        raise ConfigError(f"{where}: no base config")
    if not path.is_file():
        raise ConfigError(f"{where}: base config not found: {path}")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key in _BASE_CACHE:
        return _BASE_CACHE[key].clone()
    cfg = get_maps_cfg()
    try:  # safe_load only, the _BASE_ chain included; the error names the file at fault
        merge_config_file(cfg, path)
    except ConfigError as e:
        raise ConfigError(f"{where}: base {e}") from None
    _BASE_CACHE[key] = cfg.clone()
    return cfg


def apply_overrides(cfg: "CfgNode", overrides: Mapping[str, Any], where: str) -> None:
    """Set dotted detectron2 keys, refusing unknown keys and values of the wrong type."""
    for key, value in overrides.items():
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                siblings = list(node.keys()) if hasattr(node, "keys") else []
                prefix = ".".join(parts[:i])
                hint = difflib.get_close_matches(part, siblings, n=1)
                more = f" (did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{where}: unknown config key '{key}'{more}")
            node = node[part]
        if hasattr(node, "keys"):
            raise ConfigError(f"{where}: key '{key}' is a config group, not a value")
        if key == "SOLVER.MAX_ITER":
            raise ConfigError(f"{where}: key '{key}': set 'iterations' instead of overriding "
                              "SOLVER.MAX_ITER")
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, TypeError, AssertionError, KeyError) as e:
            raise ConfigError(f"{where}: key '{key}': bad value {value!r}: {_strip(e)}") from None


def _set_iterations(cfg: "CfgNode", iterations: Optional[int], steps_overridden: bool) -> None:
    if iterations is None:
        return
    base = int(cfg.SOLVER.MAX_ITER)
    cfg.SOLVER.MAX_ITER = int(iterations)
    if base > 0 and iterations != base and not steps_overridden:
        scaled = [int(round(s * iterations / base)) for s in cfg.SOLVER.STEPS]
        # detectron2 refuses decay steps at or past MAX_ITER, and repeated ones: a schedule
        # too short for its drops keeps those that still fall inside it
        kept: List[int] = []
        for s in scaled:
            if 0 < s < iterations and (not kept or s > kept[-1]):
                kept.append(s)
        cfg.SOLVER.STEPS = tuple(kept)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _suggest(word: str, names: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _strip(e: BaseException) -> str:
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    return " ".join(text.split())


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Every combination of a grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
