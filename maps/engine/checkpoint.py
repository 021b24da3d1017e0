"""detectron2's checkpointer, made safe for preemption and for files from elsewhere."""
from __future__ import annotations

import os

from detectron2.checkpoint import DetectionCheckpointer

from maps.errors import ConfigError
from maps.io import atomic_write_text
from maps.weights.files import SafePickleMixin

__all__ = ["RunCheckpointer", "SafeCheckpointer"]


class RunCheckpointer(SafePickleMixin, DetectionCheckpointer):
    """detectron2's checkpointer whose ``last_checkpoint`` tag is replaced atomically, and
    which reads detectron2 ``.pkl`` files (``MODEL.WEIGHTS: r50-imagenet``) with a numpy-only
    unpickler instead of ``pickle.load`` (:class:`maps.weights.files.SafePickleMixin`).

    fvcore truncates the tag, then writes it: a SIGKILL in between (preemption) leaves an
    empty tag, and ``--resume`` then fails on "Checkpoint <run dir>/ not found".
    """

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if self.save_to_disk:
            atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)


class SafeCheckpointer(RunCheckpointer):
    """detectron2's checkpointer, unpickling with ``weights_only=True``."""

    def _torch_load(self, f):
        import pickle

        import torch

        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"MODEL.WEIGHTS {f}: not a plain weights file (refused by "
                              f"torch.load(weights_only=True): {str(e).splitlines()[0]})") from None
