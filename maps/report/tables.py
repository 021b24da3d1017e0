"""The paper's Tables 1-8, regenerated from logged runs, with the paper's numbers beside them.

:func:`build_table` turns the registry's rows of one table and a run source (the run store, or
W&B: :mod:`maps.report.sources`) into a :class:`Table`: one row per experiment, one cell per
metric column, each cell the mean and sample standard deviation (``ddof=1``) over the seeds
that finished, with ``n``, the paper's number and the difference. Rows without a finished run
say what is missing (queued, running, failed, not launched) instead of a number.

Ablation rows are also compared with the table's baseline row (:data:`BASELINES`: the row the
paper compares against) by Welch's t-test over seeds, beside the gain the paper claims, so a
reader sees which of the paper's claims the runs support. :mod:`maps.report.render` writes
Markdown, LaTeX (booktabs) and CSV; :mod:`maps.report.plots` draws the PNGs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from maps.errors import ConfigError
from maps.report.sources import RunIndex, RunSource, RunStoreSource, WandbSource

__all__ = [
    "BASELINES",
    "ALPHA",
    "TESTED_METRICS",
    "Comparison",
    "Cell",
    "Row",
    "Table",
    "Report",
    "summarize",
    "welch_test",
    "build_table",
    "build_tables",
]

#: The baseline row of each table (by suite): the row the paper's text compares the others
#: with. Tables 1-4: Mask2Former (section 4.4's "+0.3 over Mask2Former"; in Table 3 the
#: paper's own 45K run, which differs from MAPS only by the memory; Table 4's plain decoder).
#: Table 5: "None", MAPS without augmentation. Table 6: row 6 (CLIP-CLS keys + TiledCLIP), the
#: design MAPS keeps. Table 7: row 4, both memories on at inference. Table 8: k = 5, the
#: paper's choice. The synthetic suite mirrors these (it has no Tables 1 and 3).
BASELINES: Dict[str, Dict[int, str]] = {
    "paper": {
        1: "coco/mask2former",
        2: "ade20k/mask2former",
        3: "cityscapes/mask2former",
        4: "ade20k/table4/mask2former",
        5: "ade20k/table5/none",
        6: "ade20k/table6/tiledclip-image",
        7: "ade20k/table7/both",
        8: "ade20k/table8/k5",
    },
    "synthetic": {
        2: "synthetic/main/mask2former",
        4: "synthetic/table4/mask2former",
        5: "synthetic/table5/none",
        6: "synthetic/table6/tiledclip-image",
        7: "synthetic/table7/both",
        8: "synthetic/table8/k5",
    },
}

#: significance level of the baseline comparison
ALPHA = 0.05
#: metrics measured by evaluation, hence compared over seeds; ``params`` and ``iters`` are
#: properties of the setup (shown, never tested)
TESTED_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
#: where a column's value lives in a run's final record
FINAL_KEYS: Dict[str, Tuple[str, ...]] = {
    "params": ("params", "params_m"),
    "iters": ("iteration", "iters"),
}


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample std with ddof=1, n); the std is NaN for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan, n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


@dataclass(frozen=True)
class Comparison:
    """One row's metric against the baseline row's, over seeds.

    ``delta`` = row mean - baseline mean. Welch's t-test (unequal variances, two-sided):
    ``t``, ``dof`` (Welch-Satterthwaite), ``p_value`` and the 95% interval of the delta; all
    None when a side has fewer than two seeds or both sides have zero variance.
    ``paper_delta`` is the gain the paper claims for the same pair of rows.
    """

    baseline: str
    delta: float
    t: Optional[float] = None
    dof: Optional[float] = None
    p_value: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    paper_delta: Optional[float] = None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA

    @property
    def verdict(self) -> str:
        """What the runs say of the paper's claimed difference (``paper_delta``):

        ``supported``: significant (p < ALPHA), same sign, and the claimed difference inside
        our 95% interval (its size too); ``direction``: significant and same sign, but the
        claimed difference outside our interval (another size: a measured -9.5 against a
        claimed -0.5); ``contradicted``: significant, opposite sign; ``not significant``;
        ``untested`` (no p-value); ``no claim`` (significant where the paper claims nothing).
        """
        if self.p_value is None:
            return "untested"
        if not self.significant:
            return "not significant"
        if self.paper_delta is None or self.paper_delta == 0:
            return "no claim"
        if (self.delta > 0) != (self.paper_delta > 0):
            return "contradicted"
        if self.ci_low is not None and self.ci_high is not None and \
                not self.ci_low <= self.paper_delta <= self.ci_high:
            return "direction"
        return "supported"


def welch_test(a: Sequence[float], b: Sequence[float]) -> Tuple[Optional[float], Optional[float],
                                                                   Optional[float], Optional[Tuple[float, float]]]:
    """Welch's two-sided t-test of mean(a) - mean(b): (t, dof, p, 95% interval) or Nones."""
    from scipy import stats

    ma, sa, na = summarize(a)
    mb, sb, nb = summarize(b)
    if na < 2 or nb < 2:
        return None, None, None, None
    va, vb = sa * sa / na, sb * sb / nb
    se2 = va + vb
    if se2 <= 0:
        return None, None, None, None
    se = math.sqrt(se2)
    t = (ma - mb) / se
    dof = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    p = float(2 * stats.t.sf(abs(t), dof))
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * se
    return t, dof, p, (ma - mb - half, ma - mb + half)


# ----------------------------------------------------------------------------------------------
# the table model
# ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One metric of one row: values per finished seed, the paper's number, the comparison."""

    metric: str
    values: Dict[int, float] = field(default_factory=dict)
    paper: Optional[float] = None
    comparison: Optional[Comparison] = None
    #: the paper's number was reconstructed from a garbled extraction (registry ``reconstructed``)
    paper_reconstructed: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return summarize(list(self.values.values()))[0]

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof=1); NaN for n < 2."""
        return summarize(list(self.values.values()))[1]

    @property
    def diff(self) -> Optional[float]:
        """Ours minus the paper's, when both exist."""
        if self.paper is None or not self.values:
            return None
        return self.mean - self.paper


@dataclass
class Row:
    """One experiment's row. ``runs`` is the state of each seed (``done`` = counted)."""

    name: str
    label: str
    runnable: bool
    run_of: Optional[str]
    cells: Dict[str, Cell]
    extra: Dict[str, Any] = field(default_factory=dict)
    runs: Dict[int, str] = field(default_factory=dict)
    is_baseline: bool = False
    confidence: Optional[str] = None
    #: finished seeds that trained from random weights where the config names pretrained files
    random_weights: Dict[int, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def n_done(self) -> int:
        return sum(1 for s in self.runs.values() if s == "done")

    @property
    def state(self) -> str:
        """``reference`` (paper numbers only), ``done``, ``partial`` or ``missing``."""
        if not self.runnable:
            return "reference"
        if self.runs and self.n_done == len(self.runs):
            return "done"
        return "partial" if self.n_done else "missing"

    def missing(self) -> str:
        """What keeps seeds from counting, e.g. ``running 1, not launched 2``; '' if none."""
        counts: Dict[str, int] = {}
        for state in self.runs.values():
            if state != "done":
                counts[state] = counts.get(state, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in counts.items())

    def runs_text(self) -> str:
        if not self.runnable:
            return "paper only"
        text = f"{self.n_done}/{len(self.runs)} done"
        missing = self.missing()
        if missing:
            text += f"; {missing}"
        if self.random_weights:
            seeds = ",".join(str(s) for s in sorted(self.random_weights))
            text += f"; random weights (seed {seeds})"
        return text


@dataclass
class Table:
    """One paper table of one suite, filled from a source."""

    number: int
    suite: str
    title: str
    columns: Tuple[str, ...]
    extra_columns: Tuple[str, ...]
    rows: List[Row]
    baseline: Optional[str]
    source: str
    warnings: List[str] = field(default_factory=list)

    @property
    def baseline_label(self) -> Optional[str]:
        for row in self.rows:
            if row.is_baseline:
                return row.label
        return None

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)


    def verdicts(self) -> Dict[str, int]:
        """How many tested (row, metric) pairs support, contradict, ... the paper's claims."""
        counts: Dict[str, int] = {}
        for row in self.rows:
            for cell in row.cells.values():
                if cell.comparison is not None:
                    v = cell.comparison.verdict
                    counts[v] = counts.get(v, 0) + 1
        return counts


@dataclass
class Report:
    """Several tables from one source, and every warning met (each once)."""

    tables: List[Table]
    warnings: List[str]


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def _final_value(final: Mapping[str, float], metric: str) -> Optional[float]:
    for key in FINAL_KEYS.get(metric, (metric,)):
        if key in final:
            return final[key]
    return None


def _fill_row(row: Row, runs: Mapping[int, Any], seeds: Sequence[int], columns: Sequence[str],
              warnings: List[str], table_name: str) -> None:
    """Per seed: its state, and each column's value from the run's final metrics."""
    for seed in sorted(set(seeds) | set(runs)):
        run = runs.get(seed)
        if run is None:
            row.runs[seed] = "not launched"
            continue
        if run.state != "done" or run.final is None:
            row.runs[seed] = run.state
            if run.problem:
                warnings.append(run.problem)
            continue
        row.runs[seed] = "done"
        if run.random_weights:
            row.random_weights[seed] = tuple(run.random_weights)
        for metric in columns:
            value = _final_value(run.final, metric)
            if value is None:
                if metric in TESTED_METRICS:
                    warnings.append(f"{run.where}: final metrics have no {metric} (column of "
                                    f"{table_name}); that cell skips seed {seed}")
                continue
            row.cells[metric].values[seed] = value


def _baseline_name(suite: str, number: int, names: Sequence[str]) -> Optional[str]:
    name = BASELINES.get(suite, {}).get(number)
    return name if name in names else None


def _paper_numbers(registry: Any, experiment: Any) -> Dict[str, float]:
    """The paper's numbers of a row; a synthetic row has none of its own, so the row it
    mirrors gives the paper's claimed differences (never a 'paper' cell)."""
    if experiment.paper:
        return dict(experiment.paper)
    if experiment.mirrors and experiment.mirrors in registry:
        return dict(registry.get(experiment.mirrors).paper)
    return {}


def _compare(table: Table, registry: Any) -> None:
    base = next((r for r in table.rows if r.is_baseline), None)
    if base is None:
        return
    experiments = {e.name: e for e in registry if e.table == table.number and e.suite == table.suite}
    base_paper = _paper_numbers(registry, experiments[base.name])
    for row in table.rows:
        if row is base or not row.runnable or row.run_of == base.run_of:
            continue
        row_paper = _paper_numbers(registry, experiments[row.name])
        for metric in table.columns:
            cell, base_cell = row.cells[metric], base.cells[metric]
            if metric not in TESTED_METRICS or not cell.values or not base_cell.values:
                continue
            a, b = list(cell.values.values()), list(base_cell.values.values())
            t, dof, p, ci = welch_test(a, b)
            claimed = (row_paper[metric] - base_paper[metric]
                       if metric in row_paper and metric in base_paper else None)
            cell.comparison = Comparison(
                baseline=base.name, delta=cell.mean - base_cell.mean, t=t, dof=dof, p_value=p,
                ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None,
                paper_delta=None if claimed is None else round(claimed, 6))


def build_table(registry: Any, source: Any, table: int, suite: str = "paper",
                baseline: Optional[str] = None) -> Table:
    """Table ``table`` of ``suite`` from ``source`` (a :class:`RunSource` or a RunStore).

    ``baseline`` overrides :data:`BASELINES` (an experiment name of the table).
    """
    source = as_source(source)
    info = registry.table(table, suite)
    experiments = [e for e in registry if e.table == table and e.suite == suite]
    names = [e.name for e in experiments]
    index: RunIndex = source.index(e.canonical_name for e in registry if e.runnable)
    if baseline is not None and baseline not in names:
        raise ConfigError(f"baseline '{baseline}' is not a row of {suite} table {table} "
                          f"(rows: {', '.join(names)})")
    base_name = baseline or _baseline_name(suite, table, names)
    columns = tuple(info.columns)
    extra: List[str] = []
    for e in experiments:
        extra += [k for k in e.cells if k not in extra]
    out = Table(number=table, suite=suite, title=info.title, columns=columns,
                extra_columns=tuple(extra), rows=[], baseline=base_name,
                source=source.description)
    table_name = f"{suite} table {table}"
    for e in experiments:
        show_paper = suite == "paper" or bool(e.paper)
        row = Row(name=e.name, label=e.row, runnable=e.runnable,
                  run_of=e.canonical_name if e.runnable else None,
                  cells={m: Cell(m, paper=e.paper.get(m) if show_paper else None,
                                 paper_reconstructed=show_paper and m in e.reconstructed)
                         for m in columns},
                  extra=dict(e.cells), is_baseline=e.name == base_name, confidence=e.confidence)
        if e.runnable:
            _fill_row(row, index.of(e.canonical_name), e.seeds, columns, out.warnings, table_name)
        out.rows.append(row)
    _compare(out, registry)
    return out


def as_source(source: Any) -> RunSource:
    """A RunSource as is; a :class:`maps.launch.runstore.RunStore` wrapped in :class:`RunStoreSource`."""
    if isinstance(source, RunSource):
        return source
    if hasattr(source, "iter_runs") and hasattr(source, "root"):
        return RunStoreSource(source)
    raise TypeError(f"not a run source: {source!r}")


def table_numbers(registry: Any, suite: str, which: Any = "all") -> List[int]:
    """The tables of ``suite`` to build: all of them, or the one asked for (checked)."""
    available = sorted(t.number for t in registry.tables if t.suite == suite)
    if which in (None, "all"):
        return available
    number = int(which)
    if number not in available:
        raise ConfigError(f"suite '{suite}' has no table {number} (it has tables "
                          f"{', '.join(map(str, available))}; registry {registry.root})")
    return [number]


def build_tables(registry: Any, source: Any, tables: Any = "all", suite: str = "paper") -> Report:
    """Every asked table of a suite, with the source's and the tables' warnings (each once),
    including runs of experiments no longer in the registry."""
    source = as_source(source)
    built = [build_table(registry, source, n, suite) for n in table_numbers(registry, suite, tables)]
    index = source.index()
    warnings = list(index.warnings)
    for experiment, runs in sorted(index.runs.items()):
        if experiment not in registry:
            for run in runs.values():
                warnings.append(f"{run.where}: experiment '{experiment}' is not in the registry "
                                "(renamed or removed?); run skipped")
    for t in built:
        warnings += t.warnings
    return Report(built, list(dict.fromkeys(warnings)))


__all__ += ["as_source", "table_numbers", "RunStoreSource", "WandbSource"]
