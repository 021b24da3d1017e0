"""``maps list``: the named experiments of the registry (``maps show NAME`` is in show.py).

Heavy imports (detectron2, torch) stay inside the command so that ``maps --help`` is fast;
``maps list`` reads only YAML unless ``--check`` asks for the full validation.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Sequence

import click



def _fmt_metric(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.1f}"  # as printed in the paper


def _status(e: Any) -> str:
    if not e.runnable:
        return "reference"
    if e.same_as:
        return f"= {e.same_as}"
    if e.eval_of:
        return f"eval of {e.eval_of}"
    return "run"


def _print_table(experiments: Sequence[Any], metrics: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "table", "row", "runs") + tuple(metrics):
        table.add_column(col, justify="right" if col in metrics or col == "table" else "left",
                         no_wrap=col in ("name", "runs"))
    for e in experiments:
        flag = "*" if e.reconstructed else ""
        table.add_row(e.name, f"{e.suite[0].upper()}{e.table}", e.row + flag, _status(e),
                      *(_fmt_metric(e.paper.get(m)) for m in metrics))
    console = Console()
    if not console.is_terminal:  # piped: do not fold names at 80 columns
        console = Console(width=200)
    console.print(table)
    console.print("table: P = paper suite, S = synthetic suite; * = label or value reconstructed "
                  "from a garbled extraction (see --json); - = not reported")


@click.command("list")
@click.option("--table", "table", type=click.IntRange(1, 8), default=None,
              help="Only the rows of this paper table (1-8).")
@click.option("--suite", type=click.Choice(["paper", "synthetic"]), default=None,
              help="Only this suite.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of entries.")
@click.option("--check", is_flag=True,
              help="Also build every runnable config and check datasets (slower: imports "
                   "detectron2), as a launch does.")
@click.option("--registry", "root", type=click.Path(file_okay=False), default=None,
              help="Registry folder (default: ./experiments, else the package's).")
def list_command(table: Optional[int], suite: Optional[str], as_json: bool, check: bool,
                 root: Optional[str]) -> None:
    """List the named experiments: every row of the paper's tables and the synthetic suite."""
    from maps.registry import METRICS, load_registry

    registry = load_registry(root, validate=check)
    experiments: List[Any] = [e for e in registry
                              if (table is None or e.table == table)
                              and (suite is None or e.suite == suite)]
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in experiments], indent=2, ensure_ascii=False))
        return
    if not experiments:
        click.echo("no experiments match")
        return
    # the selected tables' own column order (Table 3 prints Iters first), then any others
    order = [c for t in registry.tables if (table is None or t.number == table)
             and (suite is None or t.suite == suite) for c in t.columns] + list(METRICS)
    used = {m for e in experiments for m in e.paper}
    _print_table(experiments, [m for m in dict.fromkeys(order) if m in used])


# ``maps show NAME`` lives in maps/commands/show.py, which resolves a NAME through
# :func:`maps.registry.resolve_show_target`.
COMMANDS = [list_command]
