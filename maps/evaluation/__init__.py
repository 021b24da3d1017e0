"""Evaluation: panoptic quality, instance AP and semantic mIoU (the paper's five numbers).

:mod:`maps.evaluation.pq` needs only numpy and PIL; the detectron2 evaluators of
:mod:`maps.evaluation.evaluators` are imported on first use, so that ``maps eval pq`` and
``maps --help`` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from maps.evaluation.pq import PQStat, PQStatCat, pq_compute, pq_image_stats, pq_results

_LAZY = {
    "PanopticEvaluator": "maps.evaluation.evaluators",
    "InstanceAPEvaluator": "maps.evaluation.evaluators",
    "SemanticEvaluator": "maps.evaluation.evaluators",
    "build_evaluator": "maps.evaluation.evaluators",
    "flatten_results": "maps.evaluation.evaluators",
}

__all__ = ["PQStat", "PQStatCat", "pq_compute", "pq_image_stats", "pq_results", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maps.evaluation' has no attribute {name!r}")
