"""``maps tables``: the paper's tables regenerated from logged runs (library: :mod:`maps.report`).

Reads only the registry YAML and the run records (or the W&B API): no torch, no detectron2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

_TABLE_CHOICES = ["all", *(str(n) for n in range(1, 9))]


@click.command("tables")
@click.option("--table", "which", type=click.Choice(_TABLE_CHOICES), default="all", show_default=True,
              help="Paper table 1-8, or all of the suite's tables.")
@click.option("--suite", type=click.Choice(["paper", "synthetic"]), default="paper", show_default=True)
@click.option("--format", "formats", type=click.Choice(["md", "latex", "csv"]), multiple=True,
              help="Formats to write (repeatable; default: md, latex and csv). The first is printed.")
@click.option("--source", type=click.Choice(["runs", "wandb"]), default="runs", show_default=True,
              help="Read the run store, or the W&B API (needs --project, an API key and network).")
@click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
              show_default=True, help="Run store root (env MAPS_RUNS).")
@click.option("--entity", envvar="WANDB_ENTITY", default=None, help="W&B entity (env WANDB_ENTITY).")
@click.option("--project", envvar="WANDB_PROJECT", default=None, help="W&B project (env WANDB_PROJECT).")
@click.option("--wandb-timeout", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="Seconds before an unreachable W&B API is given up.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for <suite>/table<N>.{md,tex,csv} and the PNG plots (default: "
                   "RUNS_ROOT/_tables, beside the runs they come from; publish with --out results).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Also draw metric-over-iterations curves (and PQ vs k for Table 8).")
@click.option("--print/--no-print", "echo", default=True, show_default=True,
              help="Print the tables (first format) to stdout.")
@click.option("--registry", "root", type=click.Path(file_okay=False), default=None,
              help="Registry folder (default: ./experiments, else the package's).")
def tables_command(which: str, suite: str, formats: Sequence[str], source: str, runs_root: str,
                   entity: Optional[str], project: Optional[str], wandb_timeout: float, out_dir: str,
                   plots: bool, echo: bool, root: Optional[str]) -> None:
    """Build the paper's tables from logged runs: mean ± std over seeds (n), the paper's
    number and the difference, and each ablation row against the table's baseline (Welch's
    t-test). Bad or stale run records are listed as warnings after the tables."""
    from maps.registry import load_registry
    from maps.report import build_tables, render, write_tables
    from maps.report.sources import LiveWandbApi, RunStoreSource, WandbSource
    from maps.launch.runstore import RunStore

    formats = tuple(dict.fromkeys(formats)) or ("md", "latex", "csv")
    out_dir = out_dir or str(Path(runs_root) / "_tables")
    registry = load_registry(root, validate=False)
    if source == "wandb":
        run_source = WandbSource(LiveWandbApi(timeout=wandb_timeout), entity, project or "")
    else:
        run_source = RunStoreSource(RunStore(runs_root))
    report = build_tables(registry, run_source, which, suite)
    written = write_tables(report, out_dir, formats)
    if plots:
        from maps.report.plots import write_plots

        written += write_plots(report, run_source, registry, out_dir)
    if echo:
        click.echo("\n".join(render(t, formats[0]) for t in report.tables), nl=False)
    click.echo(f"wrote {len(written)} files under {out_dir}/{suite}/", err=True)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)


COMMANDS = [tables_command]
