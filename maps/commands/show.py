"""``maps show``: the resolved config of an experiment or a config file, and with
``--params`` the parameter counts of the model it builds (paper Tables 1 and 4)."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

import click


@click.command("show")
@click.argument("name", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A detectron2 config file (with _BASE_ inheritance) instead of a registry NAME.")
@click.option("--params", is_flag=True,
              help="Build the model on the CPU and print its parameter counts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@click.option("--seed", type=int, default=None,
              help="With NAME: set SEED as a run of this seed would.")
@click.option("--registry", "root", type=click.Path(file_okay=False), default=None,
              help="With NAME: registry folder (default: ./experiments, else the package's).")
@click.argument("opts", nargs=-1)
def show_command(name: Optional[str], config_path: Optional[str], params: bool, as_json: bool,
                 seed: Optional[int], root: Optional[str], opts: Sequence[str]) -> None:
    """Print the resolved config of experiment NAME or of --config FILE.

    KEY VALUE pairs after the options override the config, as on detectron2's command
    line. --params counts total, trainable, per-component and MAPS memory parameters:

    \b
      maps show --config experiments/configs/coco/maps_R50_bs16_50ep.yaml --params
      maps show coco/maps --json MODEL.MAPS.NUM_RETRIEVED 10
    """
    cfg = _resolve(name, config_path, opts, seed, root)
    counts = _parameter_counts(cfg) if params else None
    if as_json:
        payload: Dict[str, Any] = {"config": _to_plain(cfg)}
        if counts is not None:
            payload["parameters"] = counts
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(cfg.dump(), nl=False)
    if counts is not None:
        click.echo(_format_counts(counts))


def _resolve(name: Optional[str], config_path: Optional[str], opts: Sequence[str],
             seed: Optional[int], root: Optional[str]):
    from maps.errors import ConfigError

    if config_path is not None and name is not None:
        # click hands the first override to the optional NAME argument
        opts, name = (name, *opts), None
    if (name is None) == (config_path is None):
        raise ConfigError("give either an experiment NAME or --config FILE (exactly one)")
    if name is None and seed is None and root is None:
        from maps.modeling.build import load_config

        return load_config(config_path, opts)
    from maps.registry import resolve_show_target

    return resolve_show_target(name, config_path, opts, root=root, seed=seed)


def _parameter_counts(cfg) -> Dict[str, int]:
    from maps.modeling.build import build_model, count_parameters

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return count_parameters(build_model(cfg, device="cpu"))


def _format_counts(counts: Dict[str, int]) -> str:
    total = max(counts["total"], 1)
    lines = ["# parameters"]
    for key, value in counts.items():
        share = "" if key == "total" else f"  ({100.0 * value / total:.1f}%)"
        lines.append(f"#   {key:<21} {value:>12,}  {value / 1e6:7.2f}M{share}")
    return "\n".join(lines)


def _to_plain(node: Any) -> Any:
    if hasattr(node, "keys"):
        return {k: _to_plain(node[k]) for k in node.keys()}
    if isinstance(node, (list, tuple)):
        return [_to_plain(v) for v in node]
    return node


COMMANDS = [show_command]
