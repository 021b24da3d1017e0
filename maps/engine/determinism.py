"""Exact resumption: a run interrupted and resumed ends with the same weights as one that
never stopped (on CPU, with DATALOADER.NUM_WORKERS = 0).

Two things make that hold. The training sampler's stream is a function of its seed alone,
so a resumed run skips the indices the earlier attempt consumed instead of restarting the
stream. And every random number drawn during an iteration (augmentations, point sampling,
Random-Sampling and masking of the memory) comes from generators reseeded from
(seed, iteration) before the iteration's batch is loaded.
"""
from __future__ import annotations

import itertools
import random
from typing import Iterator

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's infinite shuffled stream, able to start at any position of it."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start = 0

    def skip_to(self, start: int) -> None:
        """Begin the stream at index ``start`` (per worker): call before iterating."""
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


def iteration_seed(seed: int, iteration: int) -> int:
    # a fixed odd multiplier spreads consecutive iterations over the 31-bit seed space
    return (int(seed) * 1_000_003 + int(iteration) * 2_654_435_761) % (2**31 - 1)


def reseed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class ReseedEachIteration(HookBase):
    """Before each step, reseed Python, NumPy and torch from (seed, iteration)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self) -> None:
        reseed_all(iteration_seed(self.seed, self.trainer.iter))
