"""``maps sweep NAME``: run, inspect and report the Optuna studies declared in ``sweeps/``.

Heavy imports (optuna, submitit, detectron2) stay inside the command body.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import click

from maps.errors import MapsError


@click.command("sweep")
@click.argument("name")
@click.option("--trials", type=click.IntRange(min=1), default=8, show_default=True,
              help="New trials to run in this invocation (shared by the workers).")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Workers sharing the study (Slurm jobs or local processes).")
@click.option("--executor", type=click.Choice(["slurm", "local", "debug"]), default="local",
              show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False), default=None,
              help="Cluster profile YAML for the workers (slurm/profiles/*.yaml).")
@click.option("--storage", default=None, envvar="MAPS_OPTUNA_STORAGE",
              help="Optuna storage: an RDB URL (postgresql://, mysql://) or journal:PATH; "
                   "default: a journal file <runs-root>/sweep/NAME/journal.log. A URL with a "
                   "password is better given as env MAPS_OPTUNA_STORAGE (kept out of ps and "
                   "the shell history); it is shown masked and reaches the workers through "
                   "their environment, never their pickled jobs.")
@click.option("--runs-root", type=click.Path(file_okay=False), envvar="MAPS_RUNS", default="runs",
              show_default=True, help="Run store root (env MAPS_RUNS).")
@click.option("--best", is_flag=True, help="Print the best trial's parameters and metrics.")
@click.option("--register", "register", default=None, metavar="EXPERIMENT",
              help="With --best: add the best trial to the registry as this experiment.")
@click.option("--report", is_flag=True, help="Write history/importance plots and a Markdown "
                                             "summary to --out.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of --report (default results/sweeps/NAME).")
@click.option("--detach", is_flag=True, help="Return once the workers are submitted (Slurm); "
                                             "`maps status sweep/NAME` follows them.")
@click.option("--allow-random-weights", is_flag=True,
              help="Train trials whose pretrained files are not in the weights cache from random "
                   "weights instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def sweep_command(name: str, trials: int, parallel: int, executor: str, profile: Optional[str],
                  storage: Optional[str], runs_root: str, best: bool, register: Optional[str],
                  report: bool, out: Optional[str], detach: bool, allow_random_weights: bool,
                  as_json: bool) -> None:
    """Tune the study NAME (sweeps/NAME.yaml): run workers, or show --best, or --report.

    Running it again continues the same study; trials of workers that died are marked failed.
    """
    from maps.sweep import default_storage_url, load_sweep, run_sweep

    spec = load_sweep(name)
    storage = storage or default_storage_url(runs_root, spec.name)
    if register and not best:
        raise MapsError("--register needs --best (it registers the best trial)")
    if best or report:
        from maps.sweep.report import best_trials, register_best, write_report

        if best:
            trials_ = best_trials(spec, storage)
            if as_json:
                click.echo(json.dumps([t.to_dict() for t in trials_]))
            else:
                for t in trials_:
                    click.echo(f"study {spec.name}: best trial {t.number} "
                               + " ".join(f"{k}={v:.4g}" for k, v in t.values.items()))
                    for k, v in t.params.items():
                        click.echo(f"  {k}: {v}")
                    if t.metrics:
                        click.echo("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in t.metrics.items()))
            if register:
                if len(trials_) > 1:
                    raise MapsError(f"study {spec.name} has {len(trials_)} Pareto-optimal trials; "
                                    "--register needs a single best (single-objective study)")
                path = register_best(spec, trials_[0], register)
                click.echo(f"registered {register} in {path}", err=as_json)
        if report:
            files = write_report(spec, storage, out or f"results/sweeps/{spec.name}")
            for f in files.values():
                click.echo(f"wrote {f}", err=as_json)
        return
    from maps.weights.runs import MissingWeights

    try:
        result = run_sweep(spec, trials=trials, parallel=parallel, executor=executor, storage=storage,
                           runs_root=runs_root, profile=profile, wait=not detach,
                           allow_random_weights=allow_random_weights)
    except MissingWeights as e:
        for line in e.lines:
            click.echo("error: " + " ".join(line.split()), err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({"study": result.study, "storage": result.storage,
                               "target": result.target, "trials_by_worker": result.trials_by_worker,
                               "worker_errors": result.worker_errors,
                               "stale_failed": result.stale_failed, "counts": result.counts,
                               "job_ids": result.job_ids}))
        return
    if detach:
        click.echo(f"study {result.study}: {len(result.job_ids)} workers submitted (jobs "
                   f"{', '.join(result.job_ids)}), target {result.target} trials")
        return
    if result.stale_failed:
        click.echo(f"trials of dead workers marked failed: {result.stale_failed}")
    for i, numbers in enumerate(result.trials_by_worker):
        click.echo(f"worker {i}: trials {numbers}" if numbers is not None else f"worker {i}: died")
    for e in result.worker_errors:
        click.echo(f"  {e}", err=True)
    click.echo(f"study {result.study}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(result.counts.items()))
               + f" (storage {result.storage})")


COMMANDS = [sweep_command]
