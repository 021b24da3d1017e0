"""One training run, as a function: what `maps train` and every launched job call."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Sequence

from detectron2.config import CfgNode

from maps.config import check_maps_values, config_from_yaml_text
from maps.engine.run_record import setup_run_logging
from maps.errors import ConfigError
from maps.io import atomic_write_json, atomic_write_text
from maps.weights.runs import random_weight_keys, resolve_config_weights, weights_record

logger = logging.getLogger("maps.train")

FINAL_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
#: the run's record of its pretrained files (maps.weights.runs.weights_record)
WEIGHTS_RECORD = "weights.json"
#: learning-rate schedules the trainer builds (detectron2's three and Mask2Former's poly)
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR", "WarmupPolyLR")


def validate_config(cfg: CfgNode, resume: bool = False) -> None:
    """Every check of a training config that can be made before a run writes anything.

    ``train`` calls it first, so a bad value never leaves a half-made (or a damaged) output
    folder behind: the MAPS value checks (:func:`maps.config.check_maps_values`), the solver's
    schedule, the datasets, ``OUTPUT_DIR`` and, with ``resume``, the checkpoint to resume.

    Raises:
        ConfigError: one line naming the key (or file) and what is wrong with it.
    """
    problems = check_maps_values(cfg) + _solver_problems(cfg)
    if problems:
        raise ConfigError("; ".join(f"{key}: {why}" for key, why in problems))
    _check_datasets(cfg)
    _check_output(cfg.OUTPUT_DIR, resume)


def _solver_problems(cfg: CfgNode) -> list:
    solver, problems = cfg.SOLVER, []
    if solver.IMS_PER_BATCH < 1:
        problems.append(("SOLVER.IMS_PER_BATCH", f"must be >= 1, got {solver.IMS_PER_BATCH}"))
    if not solver.BASE_LR > 0:
        problems.append(("SOLVER.BASE_LR", f"must be > 0, got {solver.BASE_LR}"))
    if solver.CHECKPOINT_PERIOD < 1:
        problems.append(("SOLVER.CHECKPOINT_PERIOD", f"must be >= 1, got {solver.CHECKPOINT_PERIOD}"))
    if cfg.TEST.EVAL_PERIOD < 0:
        problems.append(("TEST.EVAL_PERIOD", f"must be >= 0 (0: at the end only), got {cfg.TEST.EVAL_PERIOD}"))
    if solver.LR_SCHEDULER_NAME not in LR_SCHEDULERS:
        problems.append(("SOLVER.LR_SCHEDULER_NAME", f"{solver.LR_SCHEDULER_NAME!r} is not one of "
                         f"{', '.join(LR_SCHEDULERS)}"))
    elif solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        # detectron2 drops steps past MAX_ITER; the rest must rise strictly below MAX_ITER
        steps = [s for s in solver.STEPS if s <= solver.MAX_ITER]
        if any(s < 1 or s >= solver.MAX_ITER for s in steps) or steps != sorted(set(steps)):
            problems.append(("SOLVER.STEPS", f"{list(solver.STEPS)}: learning-rate drops must rise "
                             f"strictly, between 1 and SOLVER.MAX_ITER - 1 ({solver.MAX_ITER - 1})"))
    return problems


def _check_datasets(cfg: CfgNode) -> None:
    import maps.data  # noqa: F401  (registers the library's datasets)
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in known:
                raise ConfigError(f"DATASETS.{key}: {name!r} is not a registered dataset")


def _check_output(output_dir: str, resume: bool) -> None:
    if not str(output_dir).strip():
        raise ConfigError("OUTPUT_DIR is empty: give the run directory (--output)")
    out = Path(output_dir)
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"is under {folder}, which is a file"
                raise ConfigError(f"OUTPUT_DIR {out}: {where}, not a folder")
            break
    tag = out / "last_checkpoint"
    if resume and tag.is_file():
        name = tag.read_text().strip()
        if not name or not (out / name).is_file():
            raise ConfigError(f"{tag}: names checkpoint {name!r}, which is not in {out}: cannot "
                              "--resume from it (remove the tag to start from scratch)")


def train(cfg: CfgNode, resume: bool = False, writers: Sequence = (),
          hooks: Sequence = ()) -> Dict[str, float]:
    """Train ``cfg`` in ``cfg.OUTPUT_DIR``, evaluate, and return the final metrics
    (PQ, PQ_th, PQ_st, AP, mIoU; percent) with the last iteration and the parameter count.

    ``writers`` get every scalar (and the final metrics, if they have ``log_final``);
    ``hooks`` run after detectron2's default hooks (so after its evaluation).

    The config is checked first (:func:`validate_config`): nothing is written for a bad one."""
    validate_config(cfg, resume=resume)
    import maps.data  # noqa: F401  (registers datasets)
    import maps.modeling  # noqa: F401  (registers the meta-architecture)
    from maps.engine.trainer import MAPSTrainer
    from maps.evaluation import flatten_results

    memory = None
    if cfg.MODEL.MAPS.ENABLED:
        # checked before anything is written: a bad bank must not touch an existing run dir
        # (bank present and complete, every file matching the manifest's sha256, built with
        # the configured encoders, caches of each set computed against it)
        from maps.engine.trainer import memory_attacher_for
        from maps.memory.wiring import verify_memory

        memory = verify_memory(cfg, (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST))
        for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
            memory_attacher_for(cfg, name)
    # MODEL.WEIGHTS as a file for detectron2's checkpointer (a cache name would be taken for
    # a missing file: silently from scratch); refused here if a named file is missing
    cfg = resolve_config_weights(cfg)
    from detectron2.utils import comm

    main = comm.is_main_process()  # the records are rank 0's to write, once
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    setup_run_logging(str(out))
    if main:
        atomic_write_text(out / "config.yaml", cfg.dump())
        # what the run started from: name, path and sha256 of every pretrained file, and
        # the keys that started from a random initialisation
        atomic_write_json(out / WEIGHTS_RECORD, {"weights": weights_record(cfg), "random": random_weight_keys(cfg)})
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
        # detectron2's evaluation returns results on rank 0 only: whether it ran is the
        # attribute, not its value (another rank re-running it alone would hang the group)
        if hasattr(trainer, "_last_eval_results"):
            results = trainer._last_eval_results
        else:
            results = MAPSTrainer.test(cfg, trainer.model)
    finally:
        MAPSTrainer.extra_writers = []
        MAPSTrainer.extra_hooks = []
    final = {k: float(v) for k, v in flatten_results(results or {}).items()}
    final["iteration"] = int(cfg.SOLVER.MAX_ITER)
    # the tables' Params column (paper Tables 1 and 4), in millions
    final["params"] = round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3)
    if comm.get_world_size() > 1:
        final["world_size"] = comm.get_world_size()
        differ = ranks_differ(trainer.model)
        final["ranks_agree"] = not differ
        if differ:
            final["ranks_differ_on"] = differ[:10]
    if main:
        for w in writers:
            if hasattr(w, "log_final"):
                w.log_final(final)
        atomic_write_json(out / "final.json", final)
    return final


def ranks_differ(model) -> list:
    """The parameters of the model that are not the same, bit for bit, on every process of a
    distributed run (DistributedDataParallel's promise; a desync would silently train N
    different models). One sha256 per parameter per rank, gathered. Buffers are left out:
    detectron2 wraps the model with ``broadcast_buffers=False``, so the running statistics of
    a plain BatchNorm are each process's own (rank 0's are saved); FrozenBN and GN have none."""
    import hashlib

    from detectron2.utils import comm

    mine = {name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, t in model.named_parameters()}
    every = comm.all_gather(mine)
    return sorted(name for name in mine if len({d.get(name) for d in every}) > 1)


def run_facts(run_dir: str, cfg: CfgNode) -> Dict[str, object]:
    """What W&B's config gets besides the resolved config: the pretrained files (name, path,
    sha256), the keys on random weights, and the launch's overrides (from status.json)."""
    from maps.engine import run_record

    from maps.errors import MapsError

    status = run_record.read_status_file(run_dir) or {}
    try:
        weights = weights_record(cfg)
    except MapsError:  # a missing file: train() refuses it with the full message
        weights = None
    return {"weights": weights, "random_weights": random_weight_keys(cfg),
            "overrides": status.get("overrides") or {}, "experiment": status.get("experiment"),
            "seed": status.get("seed")}


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
    # tags (experiment, seed, table, git commit) and the group come from the run's status.json
    writer = WandbWriter(run_dir, cfg, job_type="train", extra_config=run_facts(run_dir, cfg))
    try:
        return train(cfg, resume=resume, writers=[writer])
    finally:
        writer.close()
