"""``maps demo``: dataset, memory, Mask2Former and MAPS trainings over seeds, evaluation, W&B
(offline) and the synthetic main-results table with the memory gain's significance, on this
machine (library: :mod:`maps.demo`)."""
from __future__ import annotations

from typing import Optional

import click


@click.command("demo")
@click.option("--quick", is_flag=True,
              help="Smoke run: a few dozen images and iterations, one seed (under 2 minutes on an "
                   "idle machine); its numbers mean nothing.")
@click.option("--fresh", is_flag=True, help="Delete the demo's folder first instead of reusing what is done.")
@click.option("--runs-root", type=click.Path(file_okay=False), default=None,
              help="Dataset, memory, run store and W&B runs of the demo "
                   "(default runs/demo, runs/demo-quick with --quick).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where the table and plots go, under <out>/synthetic/ "
                   "(default: results; <runs-root>/results with --quick).")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Trainings at a time, one thread each (default 2; 3 with --quick).")
@click.option("--iterations", type=click.IntRange(min=2), default=None,
              help="Training iterations per run (default 1000; 20 with --quick).")
@click.option("--with-aug", is_flag=True,
              help="Also train MAPS-Aug over the same seeds (half as long again; --quick always does).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Also draw metric curves.")
def demo_command(quick: bool, fresh: bool, runs_root: Optional[str], out_dir: Optional[str],
                 parallel: Optional[int], iterations: Optional[int], with_aug: bool, plots: bool) -> None:
    """Run the whole pipeline on the synthetic dataset and measure the memory gain.

    Generates the dataset, builds the memory (randomly initialised encoders: no weights can be
    downloaded here), computes the neighbour caches, trains and evaluates Mask2Former and MAPS
    (and MAPS-Aug with --with-aug) over 3 seeds each with the tiny configuration through the
    launcher and run store, logs to W&B (offline unless configured), writes the synthetic
    Table 2 mirror with `maps tables`' code (mean ± std over seeds, the difference to
    Mask2Former and Welch's p) and says in one sentence whether MAPS beats Mask2Former.
    Rerunning reuses the dataset, memory and finished runs unless --fresh.
    """
    import dataclasses
    from pathlib import Path

    from rich.console import Console

    from maps.demo import DEMO_EXPERIMENTS, FULL, MEASURED_EXPERIMENTS, QUICK, run_demo
    from maps.errors import MapsError

    console = Console()
    size = QUICK if quick else FULL
    if iterations is not None:
        size = dataclasses.replace(size, iterations=iterations)
    root = Path(runs_root or ("runs/demo-quick" if quick else "runs/demo"))
    out = Path(out_dir) if out_dir else (root / "results" if quick else Path("results"))
    experiments = DEMO_EXPERIMENTS if quick or with_aug else MEASURED_EXPERIMENTS
    result = run_demo(root, out, size=size, experiments=experiments,
                      parallel=parallel or (3 if quick else 2), fresh=fresh,
                      plots=plots, say=console.print, console=console)

    console.rule("[5/5] synthetic main results (mirrors paper Table 2)")
    click.echo(result.table_text)
    if quick:
        console.print(f"[bold yellow]--quick is a smoke run ({size.iterations} iterations, "
                      f"{size.train_images} training images, {len(size.seeds)} seed): its numbers "
                      "mean nothing; run `maps demo` for the measurement[/]")
    elif result.verdict:
        console.print(f"[bold]Result: {result.verdict}.[/]")
    if result.retrieval is not None:
        console.print(f"memory: {result.retrieval.describe()}; encoders randomly initialised")
    console.print(f"tables: {', '.join(str(p) for p in result.table_files)}")
    if result.plot_files:
        console.print(f"plots:  {', '.join(str(p) for p in result.plot_files)}")
    console.print(f"W&B offline runs ({len(result.wandb_dirs)}): "
                  + ", ".join(str(p) for p in result.wandb_dirs))
    if result.wandb_dirs:
        console.print("  upload later with: wandb sync <dir>")
    console.print(f"run store: {result.runs_root} (maps status '*' --runs-root {result.runs_root})")
    console.print(f"done in {result.seconds / 60:.1f} min")
    if result.failed:
        raise MapsError(f"{len(result.failed)} demo run(s) failed: " + "; ".join(result.failed))


COMMANDS = [demo_command]
