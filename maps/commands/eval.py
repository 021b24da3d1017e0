"""``maps eval``: score saved predictions (COCO panoptic format) with PQ / SQ / RQ."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, Mapping

import click


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate predictions saved on disk."""


def format_pq_table(results: Mapping[str, Any]) -> str:
    """Rows All / Things / Stuff, columns PQ SQ RQ (percent) and N, aligned like panopticapi's."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        pq, sq, rq = (100 * r[k] for k in ("pq", "sq", "rq"))
        lines.append(f"{name:10s}| {pq:6.2f} {sq:6.2f} {rq:6.2f} {r['n']:5d}")
    return "\n".join(lines)


def _jsonable(results: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {k: dict(results[k]) for k in ("All", "Things", "Stuff")}
    out["per_class"] = {str(k): dict(v) for k, v in results["per_class"].items()}
    return out


_FILE = click.Path(dir_okay=False)
_DIR = click.Path(file_okay=False)


@eval_group.command(name="pq")
@click.option("--gt-json", required=True, type=_FILE, help="Ground-truth COCO panoptic JSON.")
@click.option("--gt-dir", required=True, type=_DIR, help="Ground-truth PNG folder.")
@click.option("--pred-json", required=True, type=_FILE, help="Predicted COCO panoptic JSON.")
@click.option("--pred-dir", required=True, type=_DIR, help="Predicted PNG folder.")
@click.option(
    "--workers", default=0, show_default=True, type=click.IntRange(min=0),
    help="Worker processes (0: this one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result dict as JSON, in [0, 1].")
def pq_command(
    gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, workers: int, as_json: bool
) -> None:
    """Panoptic quality of a prediction folder, as COCO's panopticapi computes it."""
    from maps.evaluation.pq import pq_compute

    progress = sys.stderr.isatty()  # a bar on a terminal, no noise in logs and pipes
    results = pq_compute(
        gt_json, gt_dir, pred_json, pred_dir, num_workers=workers, progress=progress
    )
    if as_json:
        click.echo(json.dumps(_jsonable(results), indent=2))
    else:
        click.echo(format_pq_table(results))


COMMANDS = [eval_group]
