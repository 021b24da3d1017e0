"""Reading registry files: the schema, grid expansion, and ``same_as`` / ``eval_of`` resolution.

Kept apart from :mod:`maps.registry` so that the data model reads on one screen; everything
here is pure YAML and paths (no detectron2), so ``maps list`` can check the schema quickly.
Every error is a :class:`maps.errors.ConfigError` naming the file, the entry and the key.

The schema of a file, of its ``defaults``, of an entry and of a grid point is declared as
pydantic models (keys, types, ranges, allowed values; pydantic's error location names the key);
what needs more than one mapping (defaults merged into entries, grid expansion and templates,
``same_as`` / ``eval_of`` / ``mirrors`` references, base configs on disk) is checked here by hand.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Tuple

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from maps.errors import ConfigError, schema_error_message
from maps.registry.experiments import (
    _NAME_RE, _SETUP_KEYS, EVAL_ONLY_PREFIXES, METRICS, SUITES, TABLES, Experiment, TableInfo,
    expand_grid,
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
    context = {"configs": root / CONFIGS_DIR}
    f = _validate(_FileSchema, data, str(path), context)
    info = TableInfo(number=f.table, suite=f.suite, title=str(f.title), columns=tuple(f.columns),
                     source=path, notes=str(f.notes))
    defaults = data.get("defaults") or {}
    context.update(columns=info.columns, table=info.number)
    out: List[_Entry] = []
    for i, raw in enumerate(f.entries):
        label = raw.get("name") if isinstance(raw, dict) else None
        where = f"{path}: entry '{label}'" if isinstance(label, str) else f"{path}: entry #{i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
        out.extend(_parse_entry(raw, defaults, info, root, where, context))
    return info, out


def _validate(schema: type, data: Mapping[str, Any], where: str, context: Mapping[str, Any]) -> Any:
    try:
        return schema.model_validate(dict(data), context=dict(context))
    except ValidationError as e:
        raise ConfigError(schema_error_message(e, where, schema)) from None


def _parse_entry(raw: Dict[str, Any], defaults: Mapping[str, Any], info: TableInfo, root: Path,
                 where: str, context: Mapping[str, Any]) -> List[_Entry]:
    entry = _validate(_EntrySchema, raw, where, context)
    runnable = entry.runnable
    declared = {k: raw[k] for k in _SETUP_KEYS if k in raw}
    points = entry.points or {}
    combos: List[Dict[str, Any]] = [{}]
    if entry.grid is not None:
        combos = expand_grid(entry.grid)
    names = [_point_name(entry.name, combo, where) for combo in combos]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key 'grid': the grid expands to repeated names {names}")
    for key in points:
        if key not in names:
            raise ConfigError(f"{where}: key 'points': '{key}' is not a name of the grid "
                              f"(it expands to: {', '.join(names)})")
    out = []
    for combo, point_name in zip(combos, names):
        merged = {**raw, **((raw.get("points") or {}).get(point_name) or {})}
        pwhere = f"{info.source}: entry '{point_name}'"
        out.append(_make_entry(merged, point_name, combo, defaults, declared, info, root, pwhere,
                               runnable))
    return out


def _make_entry(raw: Dict[str, Any], name: str, combo: Dict[str, Any], defaults: Mapping[str, Any],
                declared: Dict[str, Any], info: TableInfo, root: Path, where: str,
                runnable: bool) -> _Entry:
    """One experiment of an entry (one grid point): ``raw`` is the entry with the point's keys
    merged in, both already checked by the schema."""
    same_as, eval_of, mirrors = raw.get("same_as"), raw.get("eval_of"), raw.get("mirrors")
    placeholders = _placeholders(combo)
    if mirrors and combo and "{" in mirrors:
        mirrors = _format(mirrors, placeholders, where, "mirrors")
    row = str(raw["row"])
    if combo and "{" in row:
        row = _format(row, placeholders, where, "row")
    paper = dict(raw.get("paper") or {})
    cells = dict(raw.get("cells") or {})
    reconstructed = raw.get("reconstructed") or {}
    for key in reconstructed:
        if key != "row" and key not in paper and key not in cells:
            raise ConfigError(f"{where}: key 'reconstructed': '{key}' is neither 'row' nor a "
                              "value of 'paper' or 'cells' of this entry")

    setup = {k: v for k, v in defaults.items()} if runnable else {}
    if runnable:
        setup.update({k: raw[k] for k in _SETUP_KEYS if k in raw})
        setup["overrides"] = {**(defaults.get("overrides") or {}), **(raw.get("overrides") or {})}
    overrides = dict(setup.get("overrides") or {})
    overrides.update(combo)
    our_choices = raw.get("our_choices") or {}
    for key in our_choices:
        if key not in overrides:
            raise ConfigError(f"{where}: key 'our_choices': '{key}' is not overridden by this "
                              "entry")

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
        base_config=base, overrides=overrides, iterations=setup.get("iterations"),
        seeds=_seeds(setup.get("seeds", 1)) if runnable else (),
        datasets=_datasets(setup.get("datasets") or {}),
        paper=paper, reconstructed={str(k): v for k, v in reconstructed.items()},
        same_as=same_as, notes=raw.get("notes", ""), source=info.source, eval_of=eval_of,
        mirrors=mirrors, memory_dataset=setup.get("memory_dataset"),
        confidence=raw.get("confidence"), cells=cells, our_choices=dict(our_choices),
        grid_point=dict(combo),
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
# the schema
# ----------------------------------------------------------------------------------------------
def _name_ref(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a name, got {value!r}")
    return value


def _config_key(key: Any) -> Any:
    if not isinstance(key, str) or not key or key != key.strip() or key.upper() != key:
        raise ValueError(f"{key!r} is not a detectron2 config key (dotted upper-case, e.g. "
                         "MODEL.MAPS.NUM_RETRIEVED)")
    return key


def _base(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str) or not value:
        configs = (info.context or {}).get("configs", CONFIGS_DIR)
        raise ValueError(f"expected a path relative to {configs}, got {value!r}")
    return value


def _iterations(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return value


def _seeds_value(value: Any) -> Any:
    """An int N means seeds 0..N-1; a list names the seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"expected a count >= 1, got {value}")
        return value
    if (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                  and s >= 0 for s in value)
            and len(set(value)) == len(value)):
        return value
    raise ValueError(f"expected a count >= 1 or a list of distinct integers >= 0, got {value!r}")


def _dataset_names(names: Any) -> Any:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"expected dataset names, got {names!r}")
    return names


def _row(value: Any) -> Any:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected text, got {value!r}")
    return value


def _paper_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r} (leave a '-' cell out)")
    return value


def _grid_values(values: Any) -> Any:
    if not isinstance(values, list) or not values:
        raise ValueError("expected a non-empty list of values")
    return values


def _reasons(value: Optional[Dict[Any, Any]]) -> Optional[Dict[Any, Any]]:
    for key, why in (value or {}).items():
        if not isinstance(why, str) or not why.strip():
            raise ValueError(f"'{key}' needs the reason as text")
    return value


_NameRef = Annotated[Any, AfterValidator(_name_ref)]
_ConfigKey = Annotated[Any, AfterValidator(_config_key)]
_Split = Literal["train", "test"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _SetupSchema(_Schema):
    """How a runnable entry trains: an entry's own keys, or the file's ``defaults``."""

    base: Annotated[Any, AfterValidator(_base)] = Field(None, description="relative to configs/")
    overrides: Optional[Dict[_ConfigKey, Any]] = None
    iterations: Annotated[Any, AfterValidator(_iterations)] = None
    seeds: Annotated[Any, AfterValidator(_seeds_value)] = None
    datasets: Optional[Dict[_Split, Annotated[Any, AfterValidator(_dataset_names)]]] = None
    memory_dataset: Optional[_NameRef] = None


class _PointSchema(_Schema):
    """What a grid point may set for its own experiment."""

    mirrors: Optional[_NameRef] = None
    row: Annotated[Any, AfterValidator(_row)] = None
    paper: Optional[Dict[str, Annotated[Any, AfterValidator(_paper_number)]]] = None
    reconstructed: Annotated[Optional[Dict[Any, Any]], AfterValidator(_reasons)] = None
    confidence: Optional[Literal["high", "medium", "low"]] = None
    same_as: Optional[_NameRef] = None
    notes: str = ""
    cells: Optional[Dict[str, Any]] = None

    @field_validator("paper")
    @classmethod
    def _paper_metrics(cls, paper: Optional[Dict[str, Any]], info: ValidationInfo) -> Any:
        columns = (info.context or {}).get("columns")
        for key in paper or {}:
            if key not in METRICS:
                raise ValueError(f"unknown metric '{key}' (known: {', '.join(METRICS)})")
            if columns is not None and key not in columns:
                raise ValueError(f"'{key}' is not a column of table {info.context.get('table')} "
                                 f"({', '.join(columns)})")
        return paper


class _EntrySchema(_SetupSchema, _PointSchema):
    """One entry of a registry file: a runnable experiment, an alias, or a reference row."""

    name: Any = Field(description="lower-case words joined by '/', e.g. 'ade20k/table5/swapped'")
    row: Annotated[Any, AfterValidator(_row)] = Field(
        description="the row's label as printed in the paper")
    runnable: bool = True
    eval_of: Optional[_NameRef] = None
    our_choices: Annotated[Optional[Dict[Any, Any]], AfterValidator(_reasons)] = None
    grid: Optional[Dict[_ConfigKey, Annotated[Any, AfterValidator(_grid_values)]]] = None
    points: Optional[Dict[str, Optional[_PointSchema]]] = None

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, grid: Optional[Dict[str, Any]]) -> Any:
        if grid is not None and not grid:
            raise ValueError("expected a mapping of config key -> list of values")
        return grid

    @model_validator(mode="after")
    def _consistent(self) -> "_EntrySchema":
        name, given = self.name, self.model_fields_set
        templated = isinstance(name, str) and self.grid is not None and "{" in name
        if not isinstance(name, str) or not (templated or _NAME_RE.match(name)):
            raise ValueError(f"key 'name': {name!r} is not a valid experiment name (lower-case "
                             "words joined by '/', e.g. 'ade20k/table5/swapped')")
        if self.same_as and self.eval_of:
            raise ValueError("'same_as' and 'eval_of' exclude each other")
        if not self.runnable:
            for key in sorted((set(_SETUP_KEYS) | {"grid", "same_as", "eval_of"}) & given):
                raise ValueError(f"key '{key}': a reference row (runnable: false) has no setup; "
                                 "it only carries the paper's numbers")
        if self.grid is None and "points" in given:
            raise ValueError("key 'points' needs a 'grid'")
        return self


def _columns(columns: Any) -> Any:
    if not isinstance(columns, list) or any(c not in METRICS for c in columns):
        bad = [c for c in columns if c not in METRICS] if isinstance(columns, list) else columns
        raise ValueError(f"unknown metric {bad!r} (known: {', '.join(METRICS)})")
    return columns


def _table(table: int) -> int:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r} (the paper has tables {TABLES[0]}-{TABLES[-1]})")
    return table


def _suite(suite: Any) -> Any:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r} (expected one of {', '.join(SUITES)})")
    return suite


def _entries(entries: Any) -> Any:
    if not isinstance(entries, list) or not entries:
        raise ValueError("expected a non-empty list")
    return entries


class _FileSchema(_Schema):
    """A registry file: one paper table of one suite (its entries are checked one by one, so
    that a message names the entry)."""

    table: Annotated[int, AfterValidator(_table)]
    suite: Annotated[Any, AfterValidator(_suite)]
    title: Any = ""
    columns: Annotated[Any, AfterValidator(_columns)] = list(METRICS)
    notes: Any = ""
    defaults: Optional[_SetupSchema] = None
    entries: Annotated[Any, AfterValidator(_entries)]


def _base_path(base: str, root: Path, where: str) -> Path:
    path = root / CONFIGS_DIR / base
    if not path.is_file():
        raise ConfigError(f"{where}: key 'base': base config not found: {path}")
    return path


def _seeds(value: Any) -> Tuple[int, ...]:
    return tuple(range(value)) if isinstance(value, int) else tuple(value)


def _datasets(value: Mapping[str, Any]) -> Dict[str, Tuple[str, ...]]:
    return {k: (names,) if isinstance(names, str) else tuple(names) for k, names in value.items()}


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
