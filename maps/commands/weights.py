"""``maps weights``: the pretrained files the paper's experiments start from."""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Sequence

import click


def experiments_needing(names: Sequence[str] = ()) -> Dict[str, List[str]]:
    """``{weight name: [experiment names]}`` over the shipped registry's runnable rows."""
    from maps.registry import load_registry
    from maps.weights import PRETRAINED
    from maps.weights.runs import weights_needed

    want = list(names) or list(PRETRAINED)
    out: Dict[str, List[str]] = {n: [] for n in want}
    for e in load_registry(validate=False):
        if not e.runnable:
            continue
        for n in weights_needed(e.build_config()):
            if n in out:
                out[n].append(e.name)
    return out


def _each(names, act, ok_line) -> None:
    """``act`` on each weight: one line each, an ``error:`` line for each failure, exit 2 if any."""
    from maps.errors import MapsError

    failed = 0
    for name in names:
        try:
            manifest = act(name)
        except MapsError as e:
            click.echo("error: " + " ".join(str(e).split()), err=True)
            failed += 1
            continue
        click.echo(ok_line(name, manifest))
    if failed:
        sys.exit(2)


@click.group("weights")
def weights() -> None:
    """The cache of pretrained files ($MAPS_WEIGHTS, default ~/.cache/maps/weights):
    ImageNet R50, OpenAI CLIP ViT-B/16, DINO ViT-B/16. Configs name them by cache name."""


def _names(names) -> list:
    from maps.weights import PRETRAINED, get_weight

    for n in names:
        get_weight(n)  # unknown names fail first, with a suggestion
    return list(names) or list(PRETRAINED)


@weights.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of text.")
def list_command(as_json: bool) -> None:
    """Each pretrained file: the experiments that need it, its cache path, present, verified."""
    from maps.errors import MapsError
    from maps.weights import PRETRAINED, cache_status, weights_dir

    try:
        needing = experiments_needing()
        note = ""
    except MapsError as e:  # the registry is optional for listing the cache
        needing, note = {n: [] for n in PRETRAINED}, f"(experiments unknown: {e})"
    rows = []
    for name, w in PRETRAINED.items():
        s = cache_status(name)
        rows.append({"name": name, "title": w.title, "library": w.library, "source": w.source,
                     "architecture": w.arch, "activation": w.activation, "used_for": w.used_for,
                     "experiments": needing.get(name, []),
                     "path": str(s.path) if s.path else str(weights_dir() / name),
                     "present": s.present, "verified": s.verified, "problem": s.problem})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"weights cache: {weights_dir()} {note}".rstrip())
    for r in rows:
        state = "verified" if r["verified"] else ("present, NOT verified" if r["present"]
                                                  else "missing")
        exps = r["experiments"]
        shown = ", ".join(exps[:4]) + (f", ... ({len(exps)} in all)" if len(exps) > 4 else "")
        click.echo(f"{r['name']}: {state}\n"
                   f"  {r['title']}; {r['library']} {r['source']}\n"
                   f"  path: {r['path']}\n"
                   f"  used for: {r['used_for']}\n"
                   f"  experiments: {shown or '-'}")


@weights.command("fetch")
@click.argument("names", nargs=-1)
def fetch_command(names) -> None:
    """Download NAMES (default: all) with each library's own mechanism into the cache.

    Without network each weight fails at once with one line naming it and the
    `maps weights add NAME FILE` alternative."""
    from maps.weights.verify import fetch_weight

    _each(_names(names), fetch_weight, lambda name, m: f"{name}: {m['file']} (sha256 {m['sha256'][:12]}, verified)")


@weights.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
def add_command(name: str, file: str) -> None:
    """Copy FILE into the cache as NAME, once it is verified (hash, keys, shapes, activation)."""
    from maps.weights import weights_dir
    from maps.weights.verify import add_weight

    m = add_weight(name, file)
    click.echo(f"{name}: {weights_dir() / name / m['file']} (sha256 {m['sha256'][:12]}, "
               f"{m['size']} bytes, verified)")


@weights.command("verify")
@click.argument("names", nargs=-1)
def verify_command(names) -> None:
    """Re-hash NAMES (default: every cached one) and load each into maps' architecture."""
    from maps.weights import cache_status, weights_dir
    from maps.weights.verify import verify_weight

    chosen = _names(names)
    if not names:
        chosen = [n for n in chosen if cache_status(n).present]
        if not chosen:
            click.echo(f"no pretrained weights in the cache ({weights_dir()})")
            return
    _each(chosen, verify_weight,
          lambda name, m: f"{name}: ok (sha256 {m['sha256'][:12]}, loads into {m['architecture']})")


COMMANDS = [weights]
