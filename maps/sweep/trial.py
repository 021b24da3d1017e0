"""A sweep trial's training: :func:`maps.engine.train.train` plus a pruning hook.

The pruning hook runs after detectron2's hooks (so after its ``EvalHook``): when an evaluation has just put
``panoptic_seg/PQ`` in the event storage, it hands that value to the trial's reporter, which
raises :class:`optuna.TrialPruned` if the pruner gives up on the trial. The exception leaves
``trainer.train()`` like any other (detectron2 runs the hooks' ``after_train`` first), and the
worker records the trial as pruned and its run as cancelled.
"""
from __future__ import annotations

import math
from typing import Any, Dict

from detectron2.engine import HookBase

from maps.sweep.spec import INTERMEDIATE_KEY


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


def train_trial(run_dir: str, config_yaml: str, seed: int, reporter: Any, writer: Any) -> Dict[str, float]:
    """Train one trial's config in ``run_dir`` and return its final metrics (as ``train``).

    The sweep's task signature: ``(run_dir, config_yaml, seed, reporter, writer)``. ``writer``
    is the trial's W&B writer (tags ``study:<name>``, ``trial:<n>``), owned by the worker.
    """
    from maps.config import config_from_yaml_text
    from maps.engine.train import train

    cfg = config_from_yaml_text(config_yaml)
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run_dir)
    cfg.SEED = int(seed)
    cfg.freeze()
    writers = [writer] if writer is not None else []
    hooks_ = [PruningHook(reporter)] if reporter is not None else []
    return train(cfg, resume=False, writers=writers, hooks=hooks_)
