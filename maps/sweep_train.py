"""A sweep trial's training: :func:`maps.engine.train.train` plus a pruning hook.

The pruning hook sits right after detectron2's ``EvalHook``: when an evaluation has just put
``panoptic_seg/PQ`` in the event storage, it hands that value to the trial's reporter, which
raises :class:`optuna.TrialPruned` if the pruner gives up on the trial. The exception leaves
``trainer.train()`` like any other (detectron2 runs the hooks' ``after_train`` first), and the
worker records the trial as pruned and its run as cancelled.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

from detectron2.engine import HookBase, hooks

from maps.engine.trainer import MAPSTrainer
from maps.io import atomic_write_json, atomic_write_text
from maps.sweep import INTERMEDIATE_KEY


class PruningHook(HookBase):
    """Report each periodic evaluation's PQ to the trial (``reporter.report(PQ, iteration)``)."""

    def __init__(self, reporter: Any, key: str = INTERMEDIATE_KEY) -> None:
        self.reporter = reporter
        self.key = key
        self._last_reported = -1

    def after_step(self) -> None:
        latest = self.trainer.storage.latest()
        if self.key not in latest:
            return
        value, iteration = latest[self.key]
        if iteration != self.trainer.iter or iteration == self._last_reported:
            return
        self._last_reported = iteration
        if math.isfinite(float(value)):
            self.reporter.report(float(value), int(iteration) + 1)


class SweepTrainer(MAPSTrainer):
    """MAPSTrainer with a :class:`PruningHook` after its evaluation hook."""

    reporter: Optional[Any] = None

    def build_hooks(self):
        ret = super().build_hooks()
        if self.reporter is None:
            return ret
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret) - 1)
        return ret[:at + 1] + [PruningHook(self.reporter)] + ret[at + 1:]


def train_trial(run_dir: str, config_yaml: str, seed: int, reporter: Any, writer: Any) -> Dict[str, float]:
    """Train one trial's config in ``run_dir`` and return its final metrics (as ``train``).

    The sweep's task signature: ``(run_dir, config_yaml, seed, reporter, writer)``. ``writer``
    is the trial's W&B writer (tags ``study:<name>``, ``trial:<n>``), owned by the worker.
    """
    import maps.data  # noqa: F401  (registers datasets)
    import maps.modeling  # noqa: F401  (registers the meta-architecture)
    from maps.engine.train import _setup_logging, config_from_yaml_text
    from maps.evaluation import flatten_results

    cfg = config_from_yaml_text(config_yaml)
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.SEED = int(seed)
    cfg.freeze()
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(str(out))
    atomic_write_text(out / "config.yaml", cfg.dump())
    SweepTrainer.extra_writers = [writer] if writer is not None else []
    SweepTrainer.reporter = reporter
    try:
        trainer = SweepTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None) or SweepTrainer.test(cfg, trainer.model)
    finally:
        SweepTrainer.extra_writers = []
        SweepTrainer.reporter = None
    final = {k: float(v) for k, v in flatten_results(results).items()}
    final["iteration"] = int(cfg.SOLVER.MAX_ITER)
    final["params"] = round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3)
    if writer is not None and hasattr(writer, "log_final"):
        writer.log_final(final)
    atomic_write_json(out / "final.json", final)
    return final
