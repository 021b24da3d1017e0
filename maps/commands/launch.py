"""``maps launch`` and ``maps status``: submit experiments' runs, and see where they stand.

Heavy imports (submitit, detectron2, the registry) stay inside the commands so that
``maps --help`` is fast.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import click

from maps.errors import MapsError

TRAIN_TASK = "maps.engine.train:run_training"


def _load_registry() -> Any:
    try:
        from maps.registry import load_registry
    except ImportError as e:
        raise MapsError(f"maps launch needs the experiment registry (maps.registry), which cannot be imported: {e}") from None
    return load_registry()


def _print_report(report: Any, dry_run: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if dry_run:
        console.print(f"[bold]dry run[/bold]: executor {report.executor}, resources per run:")
        console.print_json(json.dumps(report.resources))
    for pre in report.prerequisites:
        console.print(f"prerequisite {pre['task']} -> {pre['output_dir']}: {pre['action']}"
                      + (f" (job {pre['job_id']})" if pre.get("job_id") else ""))
    table = Table("experiment", "seed", "action", "was", "job", "why")
    for o in report.outcomes:
        table.add_row(o.experiment, str(o.seed), o.action, o.previous_state or "-", o.job_id or "-", o.reason)
    console.print(table)
    n = len(report.submitted) if not dry_run else sum(o.action == "would-submit" for o in report.outcomes)
    console.print(f"{n} of {len(report.outcomes)} runs {'would be ' if dry_run else ''}submitted")


@click.command("launch")
@click.argument("selector")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Run seeds 0..N-1 (default: each experiment's own seeds).")
@click.option("--executor", type=click.Choice(["slurm", "local", "debug"]), default="slurm", show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Cluster profile YAML (slurm/profiles/*.yaml): partition, GPUs, time, ...")
@click.option("--dry-run", is_flag=True, help="Print what would be submitted; submit nothing.")
@click.option("--retry-failed", is_flag=True, help="Also relaunch failed and cancelled runs.")
@click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
              show_default=True, help="Run store root (env MAPS_RUNS).")
def launch_command(selector: str, seeds: Optional[int], executor: str, profile: Optional[str],
                   dry_run: bool, retry_failed: bool, runs_root: str) -> None:
    """Launch the runs of the experiments matching SELECTOR (a name, table or glob).

    Idempotent: runs that are done, queued or running are not submitted again. The memory
    of MAPS runs is built first (once per distinct memory, under RUNS_ROOT/_memory), and
    evaluation-only runs (Table 7) start after the training run they evaluate.
    """
    from maps.launch import RunStore, launch, plan_runs

    specs = plan_runs(_load_registry(), selector, seeds, RunStore(runs_root), train_task=TRAIN_TASK)
    report = launch(specs, executor=executor, profile=profile, retry_failed=retry_failed,
                    dry_run=dry_run, store=RunStore(runs_root))
    _print_report(report, dry_run)


@click.command("status")
@click.argument("selector", default="*")
@click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
              show_default=True, help="Run store root (env MAPS_RUNS).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run instead of a table.")
def status_command(selector: str, runs_root: str, as_json: bool) -> None:
    """Show the state of runs (queued / running / done / failed / cancelled), checked against Slurm."""
    from rich.console import Console
    from rich.table import Table

    from maps.launch import RunStore, status_rows

    store = RunStore(runs_root)
    rows = status_rows(store, selector)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    console = Console()
    if not rows:
        console.print(f"no runs match '{selector}' in {store.root}")
        return
    table = Table("experiment", "seed", "state", "slurm", "attempt", "job", "started", "ended", "PQ", "error")
    colours = {"done": "green", "running": "cyan", "queued": "yellow", "failed": "red", "cancelled": "magenta"}
    for row in rows:
        state = row["state"] or "?"
        table.add_row(row["experiment"], str(row["seed"]), f"[{colours.get(state, 'white')}]{state}[/]",
                      row["slurm"] or "-", str(row["attempt"]), row["job_id"] or "-",
                      row["started_at"] or "-", row["ended_at"] or "-",
                      "-" if row["PQ"] is None else f"{row['PQ']:.1f}", (row["error"] or "")[:60])
    console.print(table)
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))))


COMMANDS = [launch_command, status_command]
