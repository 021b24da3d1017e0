"""Reading registry files: the schema, grid expansion, and ``same_as`` / ``eval_of`` resolution.

Kept apart from :mod:`maps.registry` so that the data model reads on one screen; everything
here is pure YAML and paths (no detectron2), so ``maps list`` can check the schema quickly.
Every error is a :class:`maps.errors.ConfigError` naming the file, the entry and the key.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from maps.errors import ConfigError
from maps.registry.experiments import (
    _DEFAULT_KEYS, _ENTRY_KEYS, _FILE_KEYS, _NAME_RE, _POINT_KEYS, _SETUP_KEYS, CONFIDENCE,
    EVAL_ONLY_PREFIXES, METRICS, SUITES, TABLES, Experiment, TableInfo, expand_grid,
)

CONFIGS_DIR = "configs"


def registry_files(root: Path) -> List[Path]:
    """Every ``*.yaml`` under ``root`` except the base configs in ``root/configs``."""
    configs = (root / CONFIGS_DIR).resolve()
    files = [p for p in root.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")
             and configs not in p.resolve().parents]
    return sorted(files, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def parse_registry_files(
        root: Path) -> Tuple[List[Experiment], List[TableInfo], Dict[str, Experiment]]:
    """Parse, expand and resolve every registry file (schema and references checked).

    Also returns, for each alias (``same_as``) that declares a setup of its own (e.g. a grid
    point), that setup as an unresolved experiment: the config checks build it and require it
    to equal its target's, so an alias can never silently stand for a different run.
    """
    entries: List["_Entry"] = []
    tables: List[TableInfo] = []
    for path in registry_files(root):
        table, file_entries = _parse_file(path, root)
        tables.append(table)
        entries.extend(file_entries)
    if not entries:
        raise ConfigError(f"experiment registry {root} declares no experiments "
                          "(expected *.yaml files with 'entries')")
    by_name: Dict[str, _Entry] = {}
    for e in entries:
        if e.name in by_name:
            first = by_name[e.name]
            raise ConfigError(f"{e.source}: entry '{e.name}': duplicate name (also declared in "
                              f"{first.source})")
        by_name[e.name] = e
    seen_tables: Dict[Tuple[str, int], Path] = {}
    for t in tables:
        if (t.suite, t.number) in seen_tables:
            raise ConfigError(f"{t.source}: table {t.number} of suite '{t.suite}' is already "
                              f"declared in {seen_tables[(t.suite, t.number)]}")
        seen_tables[(t.suite, t.number)] = t.source
    resolved: Dict[str, Experiment] = {}
    for e in entries:
        _resolve(e, by_name, resolved, [])
    for e in entries:
        _check_mirror(e, by_name)
    alias_setups = {e.name: e.experiment for e in entries
                    if e.same_as is not None and e.declared_setup}
    return [resolved[e.name] for e in entries], tables, alias_setups


# ----------------------------------------------------------------------------------------------
class _Entry:
    """One entry after schema checks and grid expansion, before references are resolved."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    name: str
    source: Path
    experiment: Experiment       # own fields, setup from defaults + entry
    declared_setup: Dict[str, Any]
    same_as: Optional[str]
    eval_of: Optional[str]
    mirrors: Optional[str]

    @property
    def where(self) -> str:
        return f"{self.source}: entry '{self.name}'"


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _parse_file(path: Path, root: Path) -> Tuple[TableInfo, List[_Entry]]:
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'table', 'suite' and 'entries', got "
                          f"{type(data).__name__}")
    _unknown_keys(data, _FILE_KEYS, str(path))
    for key in ("table", "suite", "entries"):
        if key not in data:
            raise ConfigError(f"{path}: missing key '{key}'")
    table = data["table"]
    if isinstance(table, bool) or not isinstance(table, int) or table not in TABLES:
        raise ConfigError(f"{path}: key 'table': unknown table {table!r} (the paper has tables "
                          f"{TABLES[0]}-{TABLES[-1]})")
    suite = data["suite"]
    if suite not in SUITES:
        raise ConfigError(f"{path}: key 'suite': unknown suite {suite!r} (expected one of "
                          f"{', '.join(SUITES)})")
    columns = data.get("columns", list(METRICS))
    if not isinstance(columns, list) or any(c not in METRICS for c in columns):
        bad = [c for c in columns if c not in METRICS] if isinstance(columns, list) else columns
        raise ConfigError(f"{path}: key 'columns': unknown metric {bad!r} (known: "
                          f"{', '.join(METRICS)})")
    info = TableInfo(number=table, suite=suite, title=str(data.get("title", "")),
                     columns=tuple(columns), source=path, notes=str(data.get("notes", "")))
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: key 'defaults': expected a mapping")
    _unknown_keys(defaults, _DEFAULT_KEYS, f"{path}: defaults")
    raw_entries = data["entries"]
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ConfigError(f"{path}: key 'entries': expected a non-empty list")
    out: List[_Entry] = []
    for i, raw in enumerate(raw_entries):
        label = raw.get("name") if isinstance(raw, dict) else None
        where = f"{path}: entry '{label}'" if isinstance(label, str) else f"{path}: entry #{i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
        out.extend(_parse_entry(raw, defaults, info, root, where))
    return info, out


def _parse_entry(raw: Dict[str, Any], defaults: Mapping[str, Any], info: TableInfo, root: Path,
                 where: str) -> List[_Entry]:
    _unknown_keys(raw, _ENTRY_KEYS, where)
    name = raw.get("name")
    templated = isinstance(name, str) and "grid" in raw and "{" in name  # checked once expanded
    if not isinstance(name, str) or not (templated or _NAME_RE.match(name)):
        raise ConfigError(f"{where}: key 'name': {name!r} is not a valid experiment name "
                          "(lower-case words joined by '/', e.g. 'ade20k/table5/swapped')")
    if "row" not in raw:
        raise ConfigError(f"{where}: missing key 'row' (the row's label as printed in the paper)")
    runnable = raw.get("runnable", True)
    if not isinstance(runnable, bool):
        raise ConfigError(f"{where}: key 'runnable': expected true or false, got {runnable!r}")
    same_as, eval_of = _opt_str(raw, "same_as", where), _opt_str(raw, "eval_of", where)
    if same_as and eval_of:
        raise ConfigError(f"{where}: 'same_as' and 'eval_of' exclude each other")
    declared = {k: raw[k] for k in _SETUP_KEYS if k in raw}
    if not runnable:
        for key in sorted(set(declared) | ({"grid", "same_as", "eval_of"} & set(raw))):
            raise ConfigError(f"{where}: key '{key}': a reference row (runnable: false) has no "
                              "setup; it only carries the paper's numbers")
    grid = raw.get("grid")
    points = raw.get("points") or {}
    if grid is None and "points" in raw:
        raise ConfigError(f"{where}: key 'points' needs a 'grid'")
    if not isinstance(points, dict):
        raise ConfigError(f"{where}: key 'points': expected a mapping of expanded names")
    combos: List[Dict[str, Any]] = [{}]
    if grid is not None:
        combos = _grid_combos(grid, where)
    names = [_point_name(name, combo, where) for combo in combos]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key 'grid': the grid expands to repeated names {names}")
    for key in points:
        if key not in names:
            raise ConfigError(f"{where}: key 'points': '{key}' is not a name of the grid "
                              f"(it expands to: {', '.join(names)})")
    out = []
    for combo, point_name in zip(combos, names):
        point = points.get(point_name) or {}
        if not isinstance(point, dict):
            raise ConfigError(f"{where}: points '{point_name}': expected a mapping")
        _unknown_keys(point, _POINT_KEYS, f"{where}: points '{point_name}'")
        merged = {**raw, **point}
        pwhere = f"{info.source}: entry '{point_name}'"
        out.append(_make_entry(merged, point_name, combo, defaults, declared, info, root, pwhere,
                               runnable))
    return out


def _make_entry(raw: Dict[str, Any], name: str, combo: Dict[str, Any], defaults: Mapping[str, Any],
                declared: Dict[str, Any], info: TableInfo, root: Path, where: str,
                runnable: bool) -> _Entry:
    same_as, eval_of = _opt_str(raw, "same_as", where), _opt_str(raw, "eval_of", where)
    placeholders = _placeholders(combo)
    mirrors = _opt_str(raw, "mirrors", where)
    if mirrors and combo and "{" in mirrors:
        mirrors = _format(mirrors, placeholders, where, "mirrors")
    row = raw["row"]
    if not isinstance(row, (str, int, float)) or isinstance(row, bool):
        raise ConfigError(f"{where}: key 'row': expected text, got {row!r}")
    row = str(row)
    if combo and "{" in row:
        row = _format(row, placeholders, where, "row")
    paper = _paper(raw.get("paper") or {}, info, where)
    cells = raw.get("cells") or {}
    if not isinstance(cells, dict) or any(not isinstance(k, str) for k in cells):
        raise ConfigError(f"{where}: key 'cells': expected a mapping of column name -> value")
    reconstructed = raw.get("reconstructed") or {}
    if not isinstance(reconstructed, dict):
        raise ConfigError(f"{where}: key 'reconstructed': expected a mapping of what -> why")
    for key, why in reconstructed.items():
        if key != "row" and key not in paper and key not in cells:
            raise ConfigError(f"{where}: key 'reconstructed': '{key}' is neither 'row' nor a "
                              "value of 'paper' or 'cells' of this entry")
        if not isinstance(why, str) or not why.strip():
            raise ConfigError(f"{where}: key 'reconstructed': '{key}' needs the reason as text")
    confidence = raw.get("confidence")
    if confidence is not None and confidence not in CONFIDENCE:
        raise ConfigError(f"{where}: key 'confidence': {confidence!r} is not one of "
                          f"{', '.join(CONFIDENCE)}")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise ConfigError(f"{where}: key 'notes': expected text")

    setup = {k: v for k, v in defaults.items()} if runnable else {}
    if runnable:
        setup.update({k: raw[k] for k in _SETUP_KEYS if k in raw})
        setup["overrides"] = {**(defaults.get("overrides") or {}), **(raw.get("overrides") or {})}
    overrides = _overrides(setup.get("overrides") or {}, where)
    overrides.update(combo)
    our_choices = raw.get("our_choices") or {}
    if not isinstance(our_choices, dict):
        raise ConfigError(f"{where}: key 'our_choices': expected a mapping of config key -> why")
    for key, why in our_choices.items():
        if key not in overrides:
            raise ConfigError(f"{where}: key 'our_choices': '{key}' is not overridden by this "
                              "entry")
        if not isinstance(why, str) or not why.strip():
            raise ConfigError(f"{where}: key 'our_choices': '{key}' needs the reason as text")

    base = None
    if runnable and not same_as and not eval_of:
        for key in ("base", "iterations", "datasets"):
            if key not in setup:
                raise ConfigError(f"{where}: missing key '{key}' (a runnable entry needs base, "
                                  "iterations and datasets, here or in the file's defaults)")
    if runnable and "base" in setup:
        base = _base_path(setup["base"], root, where)
    experiment = Experiment(
        name=name, suite=info.suite, table=info.number, row=row, runnable=runnable,
        base_config=base, overrides=overrides,
        iterations=_iterations(setup["iterations"], where) if "iterations" in setup else None,
        seeds=_seeds(setup.get("seeds", 1), where) if runnable else (),
        datasets=_datasets(setup.get("datasets") or {}, where),
        paper=paper, reconstructed={str(k): v for k, v in reconstructed.items()},
        same_as=same_as, notes=notes, source=info.source, eval_of=eval_of, mirrors=mirrors,
        memory_dataset=_opt_str(setup, "memory_dataset", where), confidence=confidence,
        cells=dict(cells), our_choices=dict(our_choices), grid_point=dict(combo),
    )
    declared_setup = dict(declared)
    if combo:
        declared_setup["overrides"] = {**(declared.get("overrides") or {}), **combo}
    return _Entry(name=name, source=info.source, experiment=experiment,
                  declared_setup=declared_setup, same_as=same_as, eval_of=eval_of,
                  mirrors=mirrors)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------
def _resolve(e: _Entry, by_name: Dict[str, _Entry], done: Dict[str, Experiment],
             stack: List[str]) -> Experiment:
    if e.name in done:
        return done[e.name]
    if e.name in stack:
        cycle = " -> ".join(stack[stack.index(e.name):] + [e.name])
        raise ConfigError(f"{e.where}: 'same_as'/'eval_of' form a cycle: {cycle}")
    exp = e.experiment
    if e.same_as is not None:
        target = _target(e, e.same_as, "same_as", by_name)
        t = _resolve(target, by_name, done, stack + [e.name])
        if not t.runnable:
            raise ConfigError(f"{e.where}: key 'same_as': '{e.same_as}' is a reference row "
                              "(runnable: false), not a run")
        if t.suite != exp.suite:
            raise ConfigError(f"{e.where}: key 'same_as': '{e.same_as}' is in suite '{t.suite}', "
                              f"this entry in '{exp.suite}'")
        exp = replace(exp, same_as=t.canonical_name, eval_of=t.eval_of,
                      base_config=t.base_config, overrides=dict(t.overrides),
                      iterations=t.iterations, seeds=t.seeds, datasets=dict(t.datasets),
                      memory_dataset=t.memory_dataset)
    elif e.eval_of is not None:
        target = _target(e, e.eval_of, "eval_of", by_name)
        t = _resolve(target, by_name, done, stack + [e.name])
        if not t.runnable or t.eval_of is not None:
            raise ConfigError(f"{e.where}: key 'eval_of': '{e.eval_of}' is not a trained run "
                              "(it is a reference row or an evaluation itself)")
        for key in ("base", "iterations", "seeds", "memory_dataset"):
            if key in e.declared_setup:
                raise ConfigError(f"{e.where}: key '{key}': an 'eval_of' entry evaluates the "
                                  f"model of '{e.eval_of}' and takes its training setup")
        if "train" in (e.declared_setup.get("datasets") or {}):
            raise ConfigError(f"{e.where}: key 'datasets': an 'eval_of' entry may set only the "
                              "test datasets")
        for key in exp.overrides:
            if not key.startswith(EVAL_ONLY_PREFIXES):
                raise ConfigError(f"{e.where}: key '{key}': an 'eval_of' entry may only change "
                                  f"test-time keys ({', '.join(EVAL_ONLY_PREFIXES)}...)")
        datasets = dict(t.datasets)
        if exp.datasets.get("test"):
            datasets["test"] = exp.datasets["test"]
        exp = replace(exp, eval_of=t.canonical_name, base_config=t.base_config,
                      overrides={**t.overrides, **exp.overrides}, iterations=t.iterations,
                      seeds=t.seeds, datasets=datasets, memory_dataset=t.memory_dataset)
    done[e.name] = exp
    return exp


def _target(e: _Entry, name: str, key: str, by_name: Dict[str, _Entry]) -> _Entry:
    if name not in by_name:
        from maps.registry.experiments import _suggest

        raise ConfigError(f"{e.where}: key '{key}': no experiment named '{name}'"
                          f"{_suggest(name, by_name)}")
    return by_name[name]


def _check_mirror(e: _Entry, by_name: Dict[str, _Entry]) -> None:
    if e.mirrors is None:
        return
    target = _target(e, e.mirrors, "mirrors", by_name)
    if target.experiment.suite != "paper":
        raise ConfigError(f"{e.where}: key 'mirrors': '{e.mirrors}' is not a paper entry")
    if e.experiment.suite != "synthetic":
        raise ConfigError(f"{e.where}: key 'mirrors' is for synthetic-suite entries")


# ----------------------------------------------------------------------------------------------
# fields
# ----------------------------------------------------------------------------------------------
def _unknown_keys(data: Mapping[str, Any], allowed: set, where: str) -> None:
    for key in data:
        if key not in allowed:
            import difflib

            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where}: unknown key '{key}'{more}; allowed: "
                              f"{', '.join(sorted(allowed))}")


def _opt_str(raw: Mapping[str, Any], key: str, where: str) -> Optional[str]:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: key '{key}': expected a name, got {value!r}")
    return value


def _paper(paper: Any, info: TableInfo, where: str) -> Dict[str, float]:
    if not isinstance(paper, dict):
        raise ConfigError(f"{where}: key 'paper': expected a mapping of metric -> number")
    for key, value in paper.items():
        if key not in METRICS:
            raise ConfigError(f"{where}: key 'paper': unknown metric '{key}' (known: "
                              f"{', '.join(METRICS)})")
        if key not in info.columns:
            raise ConfigError(f"{where}: key 'paper': '{key}' is not a column of table "
                              f"{info.number} ({', '.join(info.columns)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key 'paper.{key}': expected a number, got {value!r} "
                              "(leave a '-' cell out)")
    return dict(paper)


def _overrides(overrides: Any, where: str) -> Dict[str, Any]:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: key 'overrides': expected a mapping of detectron2 keys")
    for key in overrides:
        if not isinstance(key, str) or not key or key != key.strip() or key.upper() != key:
            raise ConfigError(f"{where}: key 'overrides': {key!r} is not a detectron2 config key "
                              "(dotted upper-case, e.g. MODEL.MAPS.NUM_RETRIEVED)")
    return dict(overrides)


def _grid_combos(grid: Any, where: str) -> List[Dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: key 'grid': expected a mapping of config key -> list of values")
    for key, values in grid.items():
        _overrides({key: None}, f"{where}: grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: key 'grid.{key}': expected a non-empty list of values")
    return expand_grid(grid)


def _placeholders(combo: Mapping[str, Any]) -> Dict[str, Any]:
    return {k.rsplit(".", 1)[-1].lower(): v for k, v in combo.items()}


def _point_name(name: str, combo: Dict[str, Any], where: str) -> str:
    if not combo:
        return name
    ph = _placeholders(combo)
    if len(ph) != len(combo):
        raise ConfigError(f"{where}: key 'grid': two grid keys end in the same word")
    if "{" in name:
        out = _format(name, ph, where, "name")
    else:
        out = name + "/" + "-".join(f"{k.replace('_', '-')}{_fmt(v)}" for k, v in ph.items())
    if not _NAME_RE.match(out):
        raise ConfigError(f"{where}: key 'grid': expands to an invalid name '{out}'")
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt(v) for v in value) or "none"
    return str(value)


def _format(template: str, ph: Mapping[str, Any], where: str, key: str) -> str:
    try:
        return template.format(**{k: _fmt(v) for k, v in ph.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where}: key '{key}': template {template!r} uses an unknown "
                          f"placeholder {e} (grid placeholders: {', '.join(ph)})") from None


def _base_path(base: Any, root: Path, where: str) -> Path:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: key 'base': expected a path relative to "
                          f"{root / CONFIGS_DIR}, got {base!r}")
    path = root / CONFIGS_DIR / base
    if not path.is_file():
        raise ConfigError(f"{where}: key 'base': base config not found: {path}")
    return path


def _iterations(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: key 'iterations': expected an integer >= 1, got {value!r}")
    return value


def _seeds(value: Any, where: str) -> Tuple[int, ...]:
    """An int N means seeds 0..N-1; a list names the seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: key 'seeds': expected a count >= 1, got {value}")
        return tuple(range(value))
    if (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                  and s >= 0 for s in value)
            and len(set(value)) == len(value)):
        return tuple(value)
    raise ConfigError(f"{where}: key 'seeds': expected a count >= 1 or a list of distinct "
                      f"integers >= 0, got {value!r}")


def _datasets(value: Any, where: str) -> Dict[str, Tuple[str, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: key 'datasets': expected {{train: [...], test: [...]}}")
    out: Dict[str, Tuple[str, ...]] = {}
    for key, names in value.items():
        if key not in ("train", "test"):
            raise ConfigError(f"{where}: key 'datasets': unknown split '{key}' (train, test)")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n
                                                                for n in names):
            raise ConfigError(f"{where}: key 'datasets.{key}': expected dataset names, got "
                              f"{names!r}")
        out[key] = tuple(names)
    return out
