"""`maps train`: one training run from a config file, detectron2-style overrides."""
from __future__ import annotations

import json
import sys

import click


@click.command("train", context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False),
              help="detectron2 YAML config (see experiments/configs/).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoints, metrics.json, final.json.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
@click.option("--seed", type=int, default=None, help="Overrides SEED.")
@click.option("--allow-random-weights", is_flag=True,
              help="Start from random initialisations where a pretrained file the config "
                   "names (or the paper uses) is not in the weights cache.")
@click.argument("opts", nargs=-1)
def train_command(config_file: str, output: str, resume: bool, seed, allow_random_weights: bool,
                  opts) -> None:
    """Train Mask2Former or MAPS. OPTS are KEY VALUE pairs overriding the config, e.g.
    SOLVER.MAX_ITER 200 MODEL.MAPS.NUM_RETRIEVED 10. Unknown keys and missing pretrained
    weights (`maps weights list`) fail before any work."""
    from maps.engine.train import train
    from maps.modeling.build import load_config
    from maps.weights.runs import check_weights, resolve_config_weights

    cfg = load_config(config_file, list(opts))
    problems = check_weights(cfg, allow_random=allow_random_weights)
    if problems:  # one line each, before anything is written
        for p in problems:
            click.echo("error: " + " ".join(p.split()), err=True)
        sys.exit(2)
    cfg = resolve_config_weights(cfg, allow_random=allow_random_weights)
    cfg.defrost()
    cfg.OUTPUT_DIR = output
    if seed is not None:
        cfg.SEED = seed
    cfg.freeze()
    final = train(cfg, resume=resume)
    click.echo(json.dumps(final, indent=2))


COMMANDS = [train_command]
