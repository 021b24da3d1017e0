"""Evaluation-only runs: a trained model evaluated under another config (paper Table 7).

Table 7 switches a memory off *at inference only*: the weights are those of the trained MAPS
run, the config differs only in ``MODEL.MAPS.TEST.*``. Such a run (a registry entry with
``eval_of``) trains nothing; its task, :func:`run_evaluation`, loads the final checkpoint of
the training run of the same seed (``MODEL.WEIGHTS``, set by the launcher) and writes the
same records as a training run (config.yaml, memory.json, final.json) in its own directory.

Checkpoints are read with ``torch.load(weights_only=True)``: a tampered or foreign pickle
cannot run code, and a file that needs more than tensors and plain containers is refused
with a message naming it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from detectron2.config import CfgNode

from maps.engine.checkpoint import SafeCheckpointer
from maps.errors import ConfigError
from maps.io import atomic_write_json, atomic_write_text, file_sha256

__all__ = ["evaluate", "run_evaluation", "EVAL_TASK", "MODEL_RECORD"]

logger = logging.getLogger("maps.evaluate")

#: the launcher's name for :func:`run_evaluation`
EVAL_TASK = "maps.engine.evaluate:run_evaluation"
#: which checkpoint an evaluation run evaluated (path, sha256, its training iteration)
MODEL_RECORD = "evaluated_model.json"


def evaluate(cfg: CfgNode) -> Dict[str, float]:
    """Evaluate ``cfg.MODEL.WEIGHTS`` under ``cfg`` in ``cfg.OUTPUT_DIR``; return final metrics.

    The final metrics have the training run's keys (PQ, PQ_th, PQ_st, AP, mIoU, iteration,
    params); ``iteration`` is the checkpoint's own.
    """
    import maps.data  # noqa: F401  (registers datasets)
    from maps.engine.run_record import setup_run_logging
    from maps.engine.trainer import MAPSTrainer
    from maps.evaluation import flatten_results
    from maps.modeling.build import build_model

    weights = Path(cfg.MODEL.WEIGHTS)
    if not cfg.MODEL.WEIGHTS or not weights.is_file():
        raise ConfigError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r}: the trained model to evaluate "
                          "is missing (has its training run finished?)")
    memory = None
    if cfg.MODEL.MAPS.ENABLED:
        # bank, index and neighbour caches against the manifest, before anything is written
        from maps.memory.wiring import verify_memory

        memory = verify_memory(cfg, cfg.DATASETS.TEST)
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    setup_run_logging(str(out))
    atomic_write_text(out / "config.yaml", cfg.dump())
    if memory is not None:
        atomic_write_json(out / "memory.json", memory)

    model = build_model(cfg)
    model.eval()
    checkpoint = SafeCheckpointer(model).load(str(weights), checkpointables=[])
    iteration = int(checkpoint.get("iteration", cfg.SOLVER.MAX_ITER - 1)) + 1
    atomic_write_json(out / MODEL_RECORD, {"weights": str(weights.resolve()),
                                           "sha256": file_sha256(weights), "iteration": iteration})
    logger.info("evaluating %s (iteration %d) with %s", weights, iteration, out / "config.yaml")
    results = MAPSTrainer.test(cfg, model)
    final: Dict[str, Any] = {k: float(v) for k, v in flatten_results(results).items()}
    final["iteration"] = iteration
    final["params"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    atomic_write_json(out / "final.json", final)
    return final


def run_evaluation(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, float]:
    """The launched task of an evaluation-only run (signature of ``run_training``).

    ``resume`` changes nothing: an evaluation has no state worth keeping, it starts again.
    """
    from maps.config import config_from_yaml_text

    from maps.engine.train import run_facts
    from maps.engine.wandb_writer import WandbWriter

    cfg = config_from_yaml_text(config_yaml)
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.SEED = int(seed)
    cfg.freeze()
    # an evaluation-only run (Table 7) is a W&B run too, so `maps tables --source wandb`
    # builds every table; its final metrics go in the run's summary
    writer = WandbWriter(run_dir, cfg, job_type="eval", extra_config=run_facts(run_dir, cfg))
    try:
        final = evaluate(cfg)
        writer.log_final(final)
        return final
    finally:
        writer.close()
