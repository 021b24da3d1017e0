"""detectron2 Trainer for Mask2Former and MAPS (paper section 4.3: Mask2Former's recipe)."""
from __future__ import annotations

import logging
import contextlib
import os
from typing import Any, Callable, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import DefaultTrainer
from detectron2.utils.events import EventWriter

from maps.engine.determinism import ReseedEachIteration, ResumableTrainingSampler, reseed_all
from maps.engine.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


def memory_attacher_for(cfg: CfgNode, dataset_name: str) -> Optional[Callable[[dict], dict]]:
    """The function that puts retrieved memory tokens under ``dataset_dict["memory"]`` for
    images of ``dataset_name``, or None when the model has no memory."""
    if not cfg.MODEL.MAPS.ENABLED:
        return None
    from maps.memory.wiring import build_memory_attacher

    return build_memory_attacher(cfg, dataset_name)


class _KeepOpen(EventWriter):
    """Lets detectron2's PeriodicWriter write through ``writer`` but not close it: the run's
    final metrics are logged to it after training (see maps.engine.train)."""

    def __init__(self, writer: EventWriter):
        self.writer = writer

    def write(self) -> None:
        self.writer.write()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _cpu_aware_ddp():
    """detectron2's ``create_ddp_model`` passes ``device_ids=[local rank]`` whatever the
    model's device, which DistributedDataParallel refuses for a CPU model: a multi-process run
    on CPUs (gloo) gets no device ids. Only for the trainer's construction."""
    import detectron2.engine.defaults as d2_defaults

    create = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if not any(p.is_cuda for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create


class MAPSTrainer(DefaultTrainer):
    """DefaultTrainer with Mask2Former's optimizer, the panoptic mapper, retrieved memory,
    PQ/AP/mIoU evaluation, exact resumption and the W&B writer."""

    extra_writers: List[Any] = []
    # hooks appended after detectron2's defaults (e.g. a sweep's pruning hook, which must run
    # after the EvalHook it reads)
    extra_hooks: List[Any] = []

    @classmethod
    def build_model(cls, cfg: CfgNode):
        # the initial weights depend on the seed alone, not on what ran before in the process
        reseed_all(cfg.SEED if cfg.SEED >= 0 else 0)
        return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        from maps.data.mappers import build_train_mapper

        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        mapper = build_train_mapper(cfg, memory_fn=memory_attacher_for(cfg, cfg.DATASETS.TRAIN[0]))
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        cls._last_sampler = sampler = ResumableTrainingSampler(len(dataset), seed=seed)
        # the loader's own seed: otherwise its iterator draws a base seed from the global RNG
        # when it starts, i.e. at a different iteration after a resume
        return build_detection_train_loader(
            cfg, dataset=dataset, mapper=mapper, sampler=sampler, seed=seed)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        from maps.data.mappers import PanopticDatasetMapper

        mapper = PanopticDatasetMapper(cfg, is_train=False,
                                       memory_fn=memory_attacher_for(cfg, dataset_name))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder=None):
        from maps.evaluation import build_evaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    def __init__(self, cfg: CfgNode):
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)  # the writers open their files in it
        with _cpu_aware_ddp():
            super().__init__(cfg)
        self._sampler = type(self)._last_sampler

    def build_hooks(self):
        from maps.engine.checkpoint import RunCheckpointer

        # the same checkpointer with an atomic last_checkpoint tag, before the hooks take it
        old = self.checkpointer
        self.checkpointer = RunCheckpointer(old.model, old.save_dir, save_to_disk=old.save_to_disk,
                                            **old.checkpointables)
        ret = super().build_hooks()
        seed = self.cfg.SEED if self.cfg.SEED >= 0 else 0
        # first, so that every random draw of the iteration follows the reseed
        return [ReseedEachIteration(seed)] + ret + list(self.extra_hooks)

    def build_writers(self):
        # detectron2's defaults minus TensorBoard (not installed; W&B is the experiment log)
        from detectron2.utils.events import CommonMetricPrinter, JSONWriter

        return [CommonMetricPrinter(self.max_iter),
                JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
                *(_KeepOpen(w) for w in self.extra_writers)]

    def resume_or_load(self, resume: bool = True):
        super().resume_or_load(resume=resume)
        # continue the sampler's stream where the interrupted attempt stopped
        from detectron2.utils import comm

        if resume and self.start_iter > 0 and comm.is_main_process():
            from maps.engine.run_record import trim_metrics

            dropped = trim_metrics(self.cfg.OUTPUT_DIR, self.start_iter)
            if dropped:
                logger.info("metrics.json: %d records after the checkpoint dropped (logged again "
                            "from iteration %d)", dropped, self.start_iter)

        per_worker = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self._sampler.skip_to(self.start_iter * per_worker)
