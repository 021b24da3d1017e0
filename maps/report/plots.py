"""PNG plots of a table's runs (matplotlib, Agg backend: no display needed).

* :func:`plot_curves`: each evaluation metric of the table over iterations, one colour per
  experiment (row), one line per seed, from ``metrics.json`` (RunStore.read_metrics, which
  dedupes iterations re-logged after a resume) or W&B history.
* :func:`plot_pq_vs_k`: Table 8, PQ against the number k of retrieved samples, mean ± std over
  seeds, with the paper's numbers dashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from maps.io import atomic_write_bytes
from maps.report.tables import TESTED_METRICS, Table
from maps.report.sources import HISTORY_KEYS, RunSource

__all__ = ["plot_curves", "plot_pq_vs_k", "metric_curve", "write_plots"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def metric_curve(records: Sequence[Dict[str, Any]], metric: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of ``metric`` in per-iteration records (evaluation rows only)."""
    xs, ys = [], []
    for rec in records:
        for key in HISTORY_KEYS.get(metric, (metric,)):
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                xs.append(int(rec.get("iteration", len(xs))))
                ys.append(float(value))
                break
    return xs, ys


def _save(fig: Any, path: Path) -> Path:
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_curves(table: Table, source: RunSource, path: Path,
                warnings: Optional[List[str]] = None) -> Optional[Path]:
    """Evaluation metrics over iterations for every run of ``table``; None if nothing to plot.
    A run whose history cannot be read (a corrupt metrics.json) is left out of the plot and
    named in ``warnings``."""
    from maps.errors import MapsError

    metrics = [m for m in table.columns if m in TESTED_METRICS]
    series: Dict[str, Dict[str, List[Tuple[List[int], List[float]]]]] = {}
    seen = set()
    for row in table.rows:
        if not row.runnable or row.run_of in seen:
            continue
        seen.add(row.run_of)
        for seed in sorted(row.runs):
            if row.runs[seed] in ("not launched",):
                continue
            try:
                records = source.history(row.run_of, seed)
            except MapsError as e:
                warning = f"{e}; curve skipped"
                if warnings is not None and warning not in warnings:
                    warnings.append(warning)
                continue
            for m in metrics:
                xs, ys = metric_curve(records, m)
                if xs:
                    series.setdefault(m, {}).setdefault(_legend_label(table, row), []).append((xs, ys))
    if not series:
        return None
    plt = _pyplot()
    shown = [m for m in metrics if m in series]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [_legend_label(table, r) for r in table.rows if r.runnable]
    for ax, m in zip(axes[0], shown):
        for label, curves in series[m].items():
            color = colors[labels.index(label) % len(colors)]
            for i, (xs, ys) in enumerate(curves):
                ax.plot(xs, ys, color=color, marker=".", alpha=0.85, label=label if i == 0 else None)
        ax.set_xlabel("iteration")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Table {table.number} ({table.suite}): {table.title}", fontsize=9)
    return _save(fig, path)


def _legend_label(table: Table, row: Any) -> str:
    """Tables 6-8 label rows by number: say what the number is."""
    if row.label.isdigit():
        return f"k={row.label}" if table.number == 8 else f"row {row.label}"
    return row.label


def _k_of(row: Any, experiment: Any) -> Optional[float]:
    k = experiment.grid_point.get("MODEL.MAPS.NUM_RETRIEVED") if experiment is not None else None
    if k is None:
        try:
            k = float(row.label)
        except ValueError:
            return None
    return float(k)


def plot_pq_vs_k(table: Table, registry: Any, path: Path, metric: str = "PQ") -> Optional[Path]:
    """Table 8: ``metric`` against k, ours (mean ± std over seeds) and the paper's."""
    points = []
    for row in table.rows:
        k = _k_of(row, registry.get(row.name) if row.name in registry else None)
        if k is None:
            continue
        cell = row.cells.get(metric)
        if cell is None:
            continue
        points.append((k, cell.mean if cell.values else None,
                       cell.std if cell.n > 1 else 0.0, cell.paper))
    points.sort()
    if not any(p[1] is not None or p[3] is not None for p in points):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ours = [(k, m, s) for k, m, s, _ in points if m is not None]
    if ours:
        ax.errorbar([p[0] for p in ours], [p[1] for p in ours], yerr=[p[2] for p in ours],
                    marker="o", capsize=3, label="ours (mean ± std)")
    paper = [(k, p) for k, _, _, p in points if p is not None]
    if paper:
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "--", marker="s", label="paper")
    ax.set_xlabel("k (retrieved samples per memory)")
    ax.set_ylabel(metric)
    ax.set_xticks([p[0] for p in points])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Table 8 ({table.suite}): {metric} vs k", fontsize=9)
    return _save(fig, path)


def write_plots(report: Any, source: RunSource, registry: Any, out_dir: Any) -> List[Path]:
    """``<out_dir>/<suite>/table<N>_curves.png`` per table, and ``table8_pq_vs_k.png``."""
    written = []
    for table in report.tables:
        folder = Path(out_dir) / table.suite
        p = plot_curves(table, source, folder / f"table{table.number}_curves.png",
                        warnings=report.warnings)
        if p is not None:
            written.append(p)
        if table.number == 8:
            p = plot_pq_vs_k(table, registry, folder / "table8_pq_vs_k.png")
            if p is not None:
                written.append(p)
    return written
