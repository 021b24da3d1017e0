"""``maps launch``, ``maps status``, ``maps logs`` and ``maps cancel``: the daily loop of
launching experiments' runs, following them, and stopping them.

Heavy imports (submitit, detectron2, the registry) stay inside the commands so that
``maps --help`` is fast.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from maps.errors import MapsError

TRAIN_TASK = "maps.engine.train:run_training"
RUNS_ROOT = click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
                         show_default=True, help="Run store root (env MAPS_RUNS).")
SUITE = click.option("--suite", type=click.Choice(["paper", "synthetic"]), default=None,
                     help="Which suite a bare table means (default: the paper's; the synthetic "
                          "mirror is also synthetic/tableN).")


def _load_registry() -> Any:
    try:
        from maps.registry import load_registry
    except ImportError as e:
        raise MapsError(f"maps launch needs the experiment registry (maps.registry), which cannot be imported: {e}") from None
    return load_registry()


def _console() -> Any:
    """rich's console; off a terminal (a pipe, a log) wide enough that no name is cut short."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=400)


def _hours(h: Optional[float]) -> str:
    if h is None:
        return "?"
    return f"{h:,.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:,.1f} d)"


def _print_costs(console: Any, costs: Sequence[Any]) -> None:
    from rich.table import Table

    if not costs:
        return
    unit = costs[0].unit
    table = Table("experiment", "seed", "iterations", "s/iter", "from", f"{unit}s", f"{unit}-hours")
    for c in costs:
        table.add_row(c.experiment, str(c.seed), str(c.iterations or "?"),
                      "?" if c.seconds_per_iter is None else f"{c.seconds_per_iter:.3f}", c.source,
                      str(c.devices), _hours(c.device_hours))
    console.print(table)
    known = [c.device_hours for c in costs if c.device_hours is not None]
    unknown = len(costs) - len(known)
    total = f"{unit}-hours in total: {_hours(sum(known))}" if known else f"{unit}-hours: unknown"
    if unknown:
        total += (f" ({unknown} runs without a step time: finish one run, or set seconds_per_iter "
                  "in the profile)")
    console.print(total)


def _print_report(report: Any, dry_run: bool, costs: Sequence[Any] = ()) -> None:
    from rich.table import Table

    console = _console()
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
    if dry_run:
        todo = {(o.experiment, o.seed) for o in report.outcomes if o.action == "would-submit"}
        _print_costs(console, [c for c in costs if (c.experiment, c.seed) in todo])


def _profile_sets(sets: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("profile.") or len(key) == len("profile."):
            raise MapsError(f"--set {item!r}: expected profile.KEY=VALUE (e.g. profile.timeout_min=120)")
        out[key[len("profile."):]] = value
    return out


@click.command("launch", context_settings={"ignore_unknown_options": False})
@click.argument("selector")
@click.argument("opts", nargs=-1, metavar="[KEY VALUE]...")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Run seeds 0..N-1 (default: each experiment's own seeds).")
@click.option("--executor", type=click.Choice(["slurm", "local", "debug"]), default="slurm", show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Cluster profile YAML (slurm/profiles/*.yaml): partition, GPUs, time, ...")
@click.option("--set", "sets", multiple=True, metavar="profile.KEY=VALUE",
              help="Override a profile field for this launch (repeatable), e.g. --set profile.timeout_min=120.")
@SUITE
@click.option("--dry-run", is_flag=True, help="Print what would be submitted and what it costs; submit nothing.")
@click.option("--retry-failed", is_flag=True, help="Also relaunch failed and cancelled runs.")
@click.option("--allow-random-weights", is_flag=True,
              help="Start runs whose pretrained files are not in the weights cache from random "
                   "weights (recorded in each run) instead of refusing.")
@RUNS_ROOT
def launch_command(selector: str, opts: Tuple[str, ...], seeds: Optional[int], executor: str,
                   profile: Optional[str], sets: Tuple[str, ...], suite: Optional[str], dry_run: bool,
                   retry_failed: bool, allow_random_weights: bool, runs_root: str) -> None:
    """Launch the runs of the experiments matching SELECTOR (a name, table or glob).

    KEY VALUE pairs after the selector are detectron2 config overrides applied to every
    selected run (SOLVER.BASE_LR 0.0002 ...): they become part of the run's name
    (<experiment>/+<hash>) and record, so a changed override is a new run. Idempotent: runs
    that are done, queued or running are not submitted again. The memory of MAPS runs is
    built first (once per distinct memory, under RUNS_ROOT/_memory), and evaluation-only runs
    (Table 7) start after the training run they evaluate.
    """
    from maps.launch import RunStore, estimate_costs, launch, load_profile, parse_overrides, plan_runs
    from maps.weights.runs import MissingWeights

    overrides = parse_overrides(opts)
    prof = load_profile(profile)
    if sets:
        from maps.launch.profiles import apply_profile_overrides

        prof = apply_profile_overrides(prof, _profile_sets(sets))
    store = RunStore(runs_root)
    try:
        specs = plan_runs(_load_registry(), selector, seeds, store, train_task=TRAIN_TASK,
                          overrides=overrides, suite=suite, allow_random_weights=allow_random_weights)
    except MissingWeights as e:
        _refuse(e.lines)
    report = launch(specs, executor=executor, profile=prof, retry_failed=retry_failed,
                    dry_run=dry_run, store=store)
    _print_report(report, dry_run, estimate_costs(specs, prof, store) if dry_run else ())


def _refuse(lines: Sequence[str]) -> None:
    """One ``error:`` line per problem, exit status 2 (what the CLI does for one MapsError)."""
    for line in lines:
        click.echo("error: " + " ".join(str(line).split()), err=True)
    sys.exit(2)


def _eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    m = int(seconds // 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{int(seconds % 60):02d}s"


@click.command("status")
@click.argument("selector", default="*")
@RUNS_ROOT
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run instead of a table.")
def status_command(selector: str, runs_root: str, as_json: bool) -> None:
    """Show each run's state (checked against Slurm), attempt, iteration, last PQ, ETA, job,
    log and W&B run."""
    from rich.table import Table

    from maps.launch import RunStore, status_rows

    store = RunStore(runs_root)
    rows = status_rows(store, selector)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        console = _console()
        if not rows:
            console.print(f"no runs match '{selector}' in {store.root}")
            return
        table = Table("experiment", "seed", "state", "attempt", "iter", "PQ", "ETA", "job", "log", "W&B", "error")
        colours = {"done": "green", "running": "cyan", "queued": "yellow", "failed": "red",
                   "cancelled": "magenta", "corrupt": "red"}
        for row in rows:
            state = row["state"] or "?"
            if row.get("slurm") and row["slurm"] not in ("RUNNING", "PENDING"):
                state += f" ({row['slurm']})"
            it = "-" if row.get("iteration") is None else (
                f"{row['iteration']}" + (f"/{row['max_iter']}" if row.get("max_iter") else ""))
            pq = row.get("last_pq", row.get("PQ"))
            table.add_row(row["experiment"], str(row["seed"]),
                          f"[{colours.get(row['state'], 'white')}]{state}[/]", str(row.get("attempt", 0)),
                          it, "-" if pq is None else f"{pq:.1f}", _eta(row.get("eta_s")),
                          row.get("job_id") or "-", row.get("log") or "-", row.get("wandb") or "-",
                          (row.get("error") or "")[:60])
        console.print(table)
        counts: Dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0]))))
    corrupt = [r for r in rows if r["state"] == "corrupt"]
    if corrupt:
        click.echo(f"error: {len(corrupt)} run record(s) unreadable: "
                   + "; ".join(" ".join(str(r.get("error") or r["run_dir"]).split()) for r in corrupt), err=True)
        sys.exit(1)


def _one_run(store: Any, run: str) -> Any:
    """RUN as ``experiment/seedK`` or a run directory."""
    from pathlib import Path

    path = Path(run)
    if not path.is_dir():
        path = store.root / run
    if not (path / "status.json").is_file():
        raise MapsError(f"run {run!r}: no such run in {store.root} (expected <experiment>/seed<k> "
                        "or a run directory; `maps status` lists them)")
    return path, store.read_status(path) or {}


@click.command("logs")
@click.argument("run")
@click.option("--attempt", type=click.IntRange(min=1), default=None,
              help="Logs of attempt N (a requeued or retried run has several; default: the last).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what is appended, until the run ends.")
@RUNS_ROOT
def logs_command(run: str, attempt: Optional[int], follow: bool, runs_root: str) -> None:
    """Print the logs of RUN (experiment/seedK or a run directory): the job's stdout and
    stderr, then the run's log.txt."""
    from maps.launch import RunStore
    from maps.launch.control import log_files

    store = RunStore(runs_root)
    run_dir, status = _one_run(store, run)
    files = log_files(run_dir, status, attempt)
    if not files:
        raise MapsError(f"{run_dir}: no log file yet (state {status.get('state')}); the job writes "
                        f"its logs once it starts")
    offsets: Dict[Any, int] = {}
    for path in files:
        click.echo(f"==> {path} <==")
        data = path.read_bytes()
        offsets[path] = len(data)
        click.echo(data.decode(errors="replace"), nl=False)
    while follow:
        time.sleep(1.0)
        for path in files:
            with open(path, "rb") as f:
                f.seek(offsets[path])
                more = f.read()
            if more:
                offsets[path] += len(more)
                click.echo(more.decode(errors="replace"), nl=False)
        if (store.read_status(run_dir) or {}).get("state") not in ("queued", "running"):
            break


@click.command("cancel")
@click.argument("selector")
@RUNS_ROOT
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cancel_command(selector: str, runs_root: str, yes: bool) -> None:
    """Cancel the queued and running runs matching SELECTOR (scancel on Slurm, SIGINT for a
    local job) and record them cancelled; `maps launch --retry-failed` starts them again."""
    from maps.launch import RunStore, select_runs
    from maps.launch.control import cancel_run

    store = RunStore(runs_root)
    runs = [r for r in select_runs(store, selector) if r.state in ("queued", "running")]
    if not runs:
        click.echo(f"no queued or running run matches '{selector}' in {store.root}")
        return
    if not yes and sys.stdin.isatty():
        click.confirm(f"cancel {len(runs)} run(s)?", abort=True)
    outcomes: List[Any] = [cancel_run(store, r) for r in runs]
    for o in outcomes:
        click.echo(f"{o.experiment} seed {o.seed}: {o.action} ({o.reason})")


COMMANDS = [launch_command, status_command, logs_command, cancel_command]
