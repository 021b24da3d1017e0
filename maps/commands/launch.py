"""``maps launch`` and ``maps status``: submit experiments' runs, and see where they stand.

Heavy imports (submitit, detectron2, the registry) stay inside the commands so that
``maps --help`` is fast.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional

import click

from maps.errors import MapsError

TRAIN_TASK = "maps.engine.train:run_training"


def _load_registry() -> Any:
    try:
        from maps.registry import load_registry
    except ImportError as e:
        raise MapsError(f"maps launch needs the experiment registry (maps.registry), which cannot be imported: {e}") from None
    return load_registry()


def _run_specs(selector: str, seeds: Optional[int], runs_root: str = "runs") -> List[Any]:
    """The RunSpecs of the selected experiments, with what each needs before it starts.

    A run whose experiment has a memory gets the memory's build as a prerequisite (one per
    distinct memory, shared by every run that reads it) and the memory's paths in its
    config. An evaluation-only run (``eval_of``) gets the evaluation task, the final
    checkpoint of its training run as MODEL.WEIGHTS, and that run as a dependency; the
    training run is launched too when the selection does not name it.
    """
    from maps.engine.evaluate import EVAL_TASK
    from maps.launch import RunSpec
    from maps.memory.prepare import apply_memory, memory_prereq
    from maps.runstore import RunStore

    registry = _load_registry()
    select = getattr(registry, "runs", None) or registry.select  # distinct runnable setups
    store = RunStore(runs_root)
    selected = list(select(selector))
    names = {e.canonical_name for e in selected}
    for exp in list(selected):  # the training runs that evaluation-only runs evaluate
        if exp.eval_of and exp.eval_of not in names:
            selected.insert(selected.index(exp), registry.get(exp.eval_of))
            names.add(exp.eval_of)
    memory = {}  # one memory spec -> one prerequisite
    specs = []
    for exp in selected:
        mem = exp.memory_spec()
        prereq = None
        if mem is not None:
            prereq = memory.setdefault(repr(sorted(mem.items())), memory_prereq(mem, store.root))
        for seed in (range(seeds) if seeds is not None else exp.seeds):
            experiment, _, _ = exp.run_name(seed).rpartition("/")
            cfg = exp.build_config(seed)
            if prereq is not None:
                apply_memory(cfg, prereq.output_dir)
            task, after = TRAIN_TASK, ()
            if exp.eval_of:
                trained, _, _ = exp.train_run_name(seed).rpartition("/")
                cfg.MODEL.WEIGHTS = str((store.run_dir(trained, seed) / "model_final.pth").resolve())
                task, after = EVAL_TASK, ((trained, seed),)
            specs.append(RunSpec(experiment=experiment, seed=seed, config=cfg, task=task,
                                 prerequisites=(prereq,) if prereq is not None else (), after=after))
    return specs


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
    from maps.launch import launch
    from maps.runstore import RunStore

    specs = _run_specs(selector, seeds, runs_root)
    report = launch(specs, executor=executor, profile=profile, retry_failed=retry_failed,
                    dry_run=dry_run, store=RunStore(runs_root))
    _print_report(report, dry_run)


def _selected(store: Any, selector: str) -> List[Any]:
    """Runs of the store whose experiment matches the glob, or a prefix, or a registry selection."""
    import fnmatch

    prefix = selector.rstrip("/") + "/"
    runs = list(store.iter_runs("*"))
    hits = [r for r in runs if fnmatch.fnmatchcase(r.experiment, selector) or r.experiment.startswith(prefix)]
    if hits or selector == "*":
        return hits
    try:  # a table or registry selection ("table6"): the store knows only experiment names
        from maps.registry import load_registry

        names = {e.canonical_name for e in load_registry().select(selector)}
    except Exception:
        return []
    return [r for r in runs if r.experiment in names]


@click.command("status")
@click.argument("selector", default="*")
@click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
              show_default=True, help="Run store root (env MAPS_RUNS).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run instead of a table.")
def status_command(selector: str, runs_root: str, as_json: bool) -> None:
    """Show the state of runs (queued / running / done / failed / cancelled), checked against Slurm."""
    from rich.console import Console
    from rich.table import Table

    from maps.launch import reconcile, slurm_available, slurm_job_states
    from maps.runstore import RunStore

    store = RunStore(runs_root)
    runs = _selected(store, selector)
    slurm_ids = [r.status.get("job_id") for r in runs
                 if r.status.get("executor") == "slurm" and r.state in ("queued", "running")]
    states = slurm_job_states(slurm_ids) if slurm_ids and slurm_available() else {}
    rows = []
    for r in runs:
        status = r.status
        if status.get("executor") != "slurm" or states:
            status = reconcile(store, r.run_dir, status, states) or status
        final = store.read_final(r.run_dir) or {}
        rows.append({"experiment": r.experiment, "seed": r.seed, "state": status.get("state"),
                     "slurm": states.get(status.get("job_id") or "", None), "attempt": status.get("attempt", 0),
                     "job_id": status.get("job_id"), "started_at": status.get("started_at"),
                     "ended_at": status.get("ended_at"), "PQ": final.get("PQ"), "error": status.get("error"),
                     "run_dir": str(r.run_dir)})
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
