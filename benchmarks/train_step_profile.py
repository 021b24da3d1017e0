"""Steps per second of the real training loop, before and after the loop's speed-ups (not a test).

``benchmarks/step_overhead.py`` times the model alone (forward + backward); a launched
training also loads and maps data, attaches retrieved memory, clips gradients, steps the
optimizer and runs detectron2's hooks and writers (metrics.json, the console, W&B). This
builds two :class:`maps.engine.trainer.MAPSTrainer` s of the same registry experiment (the
demo's size, the tiny config) in one process:

* **before**: the loop as it was, restored for this benchmark by :func:`legacy`: one
  optimizer group per parameter (Mask2Former's layout, one AdamW call per parameter) and
  every image and panoptic PNG decoded and checked from disk on every epoch;
* **after**: the library as it is: groups with equal hyperparameters merged and updated with
  one multi-tensor AdamW call each (bit-identical weights, ``tests/engine/test_optim.py``),
  and decoded images kept by the mapper (:class:`maps.data.mappers.DecodedCache`).

and runs them in alternating chunks of iterations (so load changes hit both alike) through
the trainer's own hooks, ``run_step`` and writers, W&B included (offline). It prints steps/s
of each, the median of the per-chunk ratios, and where the time goes (data, optimizer, rest),
with the machine's load average: on a shared machine, read the ratio, not the absolute rate.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_profile.py             # MAPS
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_profile.py --experiment synthetic/main/mask2former
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_profile.py --profile   # + cProfile of "after"

Nothing here changes what is computed: the same seed gives the same losses in both trainers
(checked at the end: the logged total losses of the two are compared iteration by iteration).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def legacy() -> Iterator[None]:
    """The training loop's costs as they were before the speed-ups (for comparison only)."""
    import maps.data.mappers as mappers
    import maps.engine.optim as optim

    saved = (optim.merge_equal_groups, optim.FOREACH, mappers.DECODED_CACHE_BYTES)
    optim.merge_equal_groups = lambda groups: groups  # one group per parameter ...
    optim.FOREACH = None                               # ... each updated by its own AdamW loop
    mappers.DECODED_CACHE_BYTES = 0                    # decode every image every epoch
    try:
        yield
    finally:
        optim.merge_equal_groups, optim.FOREACH, mappers.DECODED_CACHE_BYTES = saved


def build_trainer(cfg: Any, out: Path, wandb: bool) -> Any:
    """A MAPSTrainer ready to step: W&B writer (as launched runs have), no evaluation and no
    checkpoints (they are not per-step costs)."""
    from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer

    from maps.engine.trainer import MAPSTrainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(out)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.freeze()
    writers = []
    if wandb:
        from maps.engine.wandb_writer import WandbWriter

        writers.append(WandbWriter(str(out), cfg))
    MAPSTrainer.extra_writers = writers
    try:
        trainer = MAPSTrainer(cfg)
    finally:
        MAPSTrainer.extra_writers = []
    trainer.resume_or_load(resume=False)
    trainer._hooks = [h for h in trainer._hooks if not isinstance(h, (EvalHook, PeriodicCheckpointer))]
    trainer._bench_writers = writers
    return trainer


class Stepper:
    """Drives a trainer's loop by hand (what ``TrainerBase.train`` does), a chunk at a time,
    timing each iteration and the optimizer's share of it."""

    def __init__(self, trainer: Any):
        from detectron2.utils.events import EventStorage

        self.trainer = trainer
        self.storage = EventStorage(trainer.start_iter)
        self.iter = trainer.start_iter
        self.step_s: List[float] = []
        self.opt_s: List[float] = []
        optimizer = trainer.optimizer
        step = optimizer.step

        def timed_step(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return step(*a, **kw)
            finally:
                self.opt_s.append(time.perf_counter() - t0)

        optimizer.step = timed_step
        with self.storage:
            trainer.storage = self.storage
            trainer.before_train()

    def run(self, n: int) -> float:
        t = self.trainer
        start = time.perf_counter()
        with self.storage:
            for _ in range(n):
                t0 = time.perf_counter()
                t.iter = self.iter
                t.before_step()
                t.run_step()
                t.after_step()
                self.iter += 1
                self.step_s.append(time.perf_counter() - t0)
        return time.perf_counter() - start

    def close(self) -> None:
        for w in self.trainer._bench_writers:
            w.close()

    def data_s(self) -> List[float]:
        return [v for v, _ in self.storage.history("data_time").values()]

    def losses(self) -> Dict[int, float]:
        return {it: v for v, it in self.storage.history("total_loss").values()}


def _ms(xs: List[float]) -> str:
    return f"{1e3 * statistics.median(xs):6.1f} ms" if xs else "     n/a"


def summarize(name: str, s: Stepper, warmup: int) -> Dict[str, float]:
    steps, opt, data = s.step_s[warmup:], s.opt_s[warmup:], s.data_s()[warmup:]
    mean = statistics.fmean(steps)
    print(f"  {name:6s}  {1 / mean:5.2f} steps/s  (mean {1e3 * mean:.1f} ms, median {_ms(steps).strip()}; "
          f"data {_ms(data).strip()}, optimizer {_ms(opt).strip()}, "
          f"rest {1e3 * (statistics.median(steps) - statistics.median(opt) - statistics.median(data)):.1f} ms)")
    return {"steps_per_s": 1 / mean}


@click.command()
@click.option("--experiment", default="synthetic/main/maps", show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=20, show_default=True,
              help="Iterations per turn; the two trainers alternate turns.")
@click.option("--rounds", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Iterations each trainer runs first, left out of the figures.")
@click.option("--root", type=click.Path(file_okay=False), default="/tmp/maps-train-step-profile",
              show_default=True, help="Dataset, memory and the trainers' scratch output.")
@click.option("--wandb/--no-wandb", default=True, show_default=True, help="Include the W&B writer (offline).")
@click.option("--profile", is_flag=True, help="Also print cProfile's top functions of the 'after' trainer.")
def main(experiment: str, chunk: int, rounds: int, warmup: int, root: str, wandb: bool, profile: bool) -> None:
    import torch

    from maps.data.synthetic import dataset_fingerprint
    from maps.demo import (FINGERPRINT_FACT, DemoSize, configure_environment, ensure_dataset,
                           ensure_memory, memory_spec, register_dataset, run_specs)
    from maps.registry import load_registry

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    root_p = Path(root).absolute()
    size = DemoSize(400, 100, iterations=100_000, seeds=(0,), evals=1)
    configure_environment(root_p / "datasets")
    dataset_root, _ = ensure_dataset(root_p / "datasets" / "synthetic", size, progress=False)
    register_dataset(dataset_root)
    exp = load_registry().get(experiment)
    spec = memory_spec([exp])
    memory = None
    if spec is not None:
        memory, _ = ensure_memory(spec, root_p, root_p / "datasets",
                                  made_facts={FINGERPRINT_FACT: dataset_fingerprint(dataset_root)})
    cfg = run_specs([exp], size, memory)[0].config
    import maps.data  # noqa: F401
    import maps.modeling  # noqa: F401

    with legacy():
        before = Stepper(build_trainer(cfg, root_p / "out-before", wandb))
    after = Stepper(build_trainer(cfg, root_p / "out-after", wandb))
    load0 = os.getloadavg()
    if warmup:
        before.run(warmup)
        after.run(warmup)
    ratios = []
    for r in range(rounds):
        pair = (before, after) if r % 2 == 0 else (after, before)
        took = {id(s): s.run(chunk) for s in pair}
        ratios.append(took[id(before)] / took[id(after)])
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        after.run(chunk)
        prof.disable()
    load1 = os.getloadavg()
    print(f"\n{experiment}: the real training loop (hooks, writers{', W&B offline' if wandb else ''}), "
          f"{rounds} alternating turns of {chunk} iterations each after {warmup} of warm-up; "
          f"one thread; load average {load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} cores")
    b = summarize("before", before, warmup)
    a = summarize("after", after, warmup)
    print(f"  speed-up: {a['steps_per_s'] / b['steps_per_s']:.3f}x overall; per turn, median "
          f"time(before) / time(after) = {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} turns)")
    lb, la = before.losses(), after.losses()
    common = sorted(set(lb) & set(la))
    same = all(lb[i] == la[i] for i in common)
    print(f"  same total loss at all {len(common)} iterations both logged: {same}")
    for s in (before, after):
        s.close()
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    if not same:
        raise SystemExit("the two trainers computed different losses")


if __name__ == "__main__":
    main()
