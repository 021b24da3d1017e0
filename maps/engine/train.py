"""One training run, as a function: what `maps train` and every launched job call."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Sequence

from detectron2.config import CfgNode

from maps.config import config_from_yaml_text
from maps.engine.run_record import setup_run_logging
from maps.io import atomic_write_json, atomic_write_text

logger = logging.getLogger("maps.train")

FINAL_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")


def train(cfg: CfgNode, resume: bool = False, writers: Sequence = (),
          hooks: Sequence = ()) -> Dict[str, float]:
    """Train ``cfg`` in ``cfg.OUTPUT_DIR``, evaluate, and return the final metrics
    (PQ, PQ_th, PQ_st, AP, mIoU; percent) with the last iteration and the parameter count.

    ``writers`` get every scalar (and the final metrics, if they have ``log_final``);
    ``hooks`` run after detectron2's default hooks (so after its evaluation)."""
    import maps.data  # noqa: F401  (registers datasets)
    import maps.modeling  # noqa: F401  (registers the meta-architecture)
    from maps.engine.trainer import MAPSTrainer
    from maps.evaluation import flatten_results

    memory = None
    if cfg.MODEL.MAPS.ENABLED:
        # checked before anything is written: a bad bank must not touch an existing run dir
        # (bank present and complete, built with the configured encoders, caches of each set)
        from maps.engine.trainer import memory_attacher_for
        from maps.memory.wiring import bank_record

        memory = {**bank_record(cfg.MODEL.MAPS.MEMORY.BANK),
                  "neighbors": os.path.abspath(cfg.MODEL.MAPS.MEMORY.NEIGHBORS),
                  "online": bool(cfg.MODEL.MAPS.MEMORY.ONLINE)}
        for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
            memory_attacher_for(cfg, name)
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    setup_run_logging(str(out))
    atomic_write_text(out / "config.yaml", cfg.dump())
    if memory is not None:
        # the run names the memory it read: bank path and manifest hash, neighbour caches
        atomic_write_json(out / "memory.json", memory)

    MAPSTrainer.extra_writers = list(writers)
    MAPSTrainer.extra_hooks = list(hooks)
    try:
        trainer = MAPSTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        if trainer.start_iter < trainer.max_iter:
            trainer.train()
        results = getattr(trainer, "_last_eval_results", None)
        if not results:
            results = MAPSTrainer.test(cfg, trainer.model)
    finally:
        MAPSTrainer.extra_writers = []
        MAPSTrainer.extra_hooks = []
    final = {k: float(v) for k, v in flatten_results(results).items()}
    final["iteration"] = int(cfg.SOLVER.MAX_ITER)
    # the tables' Params column (paper Tables 1 and 4), in millions
    final["params"] = round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3)
    for w in writers:
        if hasattr(w, "log_final"):
            w.log_final(final)
    atomic_write_json(out / "final.json", final)
    return final


def run_training(run_dir: str, config_yaml: str, seed: int, resume: bool) -> Dict[str, float]:
    """The task every launched job runs (see :mod:`maps.launch`)."""
    cfg = config_from_yaml_text(config_yaml)
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.SEED = int(seed)
    cfg.freeze()
    from maps.engine.wandb_writer import WandbWriter

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    setup_run_logging(str(run_dir))  # so that a W&B warning reaches log.txt too
    # tags (experiment, seed, table, git commit) come from the run's status.json
    writer = WandbWriter(run_dir, cfg)
    try:
        return train(cfg, resume=resume, writers=[writer])
    finally:
        writer.close()
