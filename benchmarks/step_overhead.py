"""Training-step overhead of MAPS over Mask2Former at the same configuration.

Both models are built in one process from the same MAPS config (the baseline with
MODEL.MAPS.ENABLED False, which is exactly Mask2Former), fed the same random batch, with
random retrieved memory tokens of the bank's widths already attached to each image (as the
data loader does), so the measured difference is the model's own: collating the tokens,
projecting them and the memory cross-attention layers, forward and backward.

The two models' steps are interleaved (alternating which goes first) after a warm-up, so
drifts in machine load hit both alike; the overhead is the median of the per-pair ratios
MAPS / Mask2Former, with its interquartile range. Target (paper: memory is cheap): <= 1.05.

    python benchmarks/step_overhead.py --preset tiny
    python benchmarks/step_overhead.py --preset r50 --image-size 256       # CPU, reduced
    python benchmarks/step_overhead.py --preset r50 --image-size 1024      # on a GPU
    python benchmarks/step_overhead.py --preset tiny --profile             # where time goes

Runs on CUDA when available (``--device`` to choose). On a shared CPU, pin threads
(``OMP_NUM_THREADS=1``) and expect a wide spread.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # name: (MAPS config, default image size, default batch)
    "tiny": ("experiments/configs/synthetic/maps_tiny.yaml", 128, 2),
    "r50": ("experiments/configs/coco/maps_R50_bs16_50ep.yaml", 1024, 2),
}


def build_pair(config: str, device: str, opts: Sequence[str]):
    """(Mask2Former, MAPS) built from the same config, same initial weights where shared."""
    from maps.modeling.build import build_model, load_config

    cfg = load_config(config, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", *opts],
                      freeze=False)
    cfg.MODEL.MAPS.ENABLED = True
    torch.manual_seed(0)
    maps_model = build_model(cfg).train()
    base_cfg = cfg.clone()
    base_cfg.MODEL.MAPS.ENABLED = False
    torch.manual_seed(0)
    base_model = build_model(base_cfg).train()
    missing = base_model.load_state_dict(maps_model.state_dict(), strict=False).missing_keys
    assert not missing, missing  # every Mask2Former weight is in MAPS: same starting point
    return cfg, base_model, maps_model


def make_batch(cfg, batch: int, size: int, objects_per_image: int, seed: int = 0) -> List[Dict]:
    """Random images with random box-shaped instances, and random memory tokens: k
    retrieved images per image, each with ``objects_per_image`` object tokens."""
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(seed)
    m = cfg.MODEL.MAPS
    k = m.POOL_SIZE if m.RANDOM_SAMPLING else m.NUM_RETRIEVED
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    out = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        n = 6
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(n):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[i, y0:y0 + size // 3, x0:x0 + size // 3] = True
        inst = Instances((size, size))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = masks
        memory = {
            "scene": torch.randn(k, m.SCENE_MEMORY_DIM, generator=g),
            "object": torch.randn(k * objects_per_image, m.OBJECT_MEMORY_DIM, generator=g),
            "object_slot": torch.arange(k).repeat_interleave(objects_per_image),
        }
        out.append({"image": image, "instances": inst, "memory": memory,
                    "height": size, "width": size})
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_fn(model: torch.nn.Module, batch: List[Dict], device: str) -> Callable[[], float]:
    """One forward + backward (no optimizer update), returning its wall time in seconds."""

    def step() -> float:
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        losses = model(batch)
        sum(losses.values()).backward()
        _sync(device)
        return time.perf_counter() - t0

    return step


def _quartiles(xs: Sequence[float]):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def measure(base: Callable[[], float], maps: Callable[[], float], steps: int,
            warmup: int) -> Dict[str, List[float]]:
    """Interleaved timings: per pair, the order alternates so neither model always runs
    right after the other's memory traffic."""
    for _ in range(warmup):
        base(), maps()
    times: Dict[str, List[float]] = {"base": [], "maps": []}
    try:
        from tqdm import tqdm
        it = tqdm(range(steps), desc="interleaved steps", unit="pair", leave=False)
    except ImportError:  # pragma: no cover
        it = range(steps)
    for i in it:
        if i % 2:
            tm, tb = maps(), base()
        else:
            tb, tm = base(), maps()
        times["base"].append(tb)
        times["maps"].append(tm)
    return times


@contextlib.contextmanager
def _timed_methods(targets: Dict[str, tuple], totals: Dict[str, float], device: str):
    """Wrap ``obj.method`` for each (obj, method) to add its forward wall time to totals."""
    saved = []
    for label, (obj, name) in targets.items():
        original = getattr(obj, name)

        def wrapper(*a, _orig=original, _label=label, **kw):
            _sync(device)
            t0 = time.perf_counter()
            result = _orig(*a, **kw)
            _sync(device)
            totals[_label] += time.perf_counter() - t0
            return result

        setattr(obj, name, wrapper)
        saved.append((obj, name))
    try:
        yield
    finally:
        for obj, name in saved:
            delattr(obj, name)  # back to the class's method


def profile_maps(maps_model, batch, device: str, steps: int) -> None:
    """Where MAPS's extra forward time goes: collating the tokens, their projection
    (MemoryFusion.prepare), the memory cross-attention layers; then torch.profiler's top ops."""
    fusion = maps_model.sem_seg_head.predictor.memory_fusion
    targets = {"collate (MemoryTokens.collate + to device)": (maps_model, "collate_memory"),
               "memory projection (MemoryFusion.prepare)": (fusion, "prepare")}
    for layer, module in fusion.layers.items():
        targets[f"memory cross-attention, decoder layer {layer}"] = (module, "forward")
    totals: Dict[str, float] = defaultdict(float)
    step = step_fn(maps_model, batch, device)
    total = 0.0
    with _timed_methods(targets, totals, device):
        for _ in range(steps):
            total += step()
    print(f"\nMAPS forward parts over {steps} steps (forward only; backward not split):")
    for label, t in totals.items():
        print(f"  {label:55s} {1000 * t / steps:8.2f} ms/step  {100 * t / total:5.1f}% of step")
    print(f"  {'whole step (forward + backward)':55s} {1000 * total / steps:8.2f} ms/step")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(max(2, steps // 4)):
            step()
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--config", help="a MAPS config instead of the preset's")
    p.add_argument("--image-size", type=int, help="square input size (preset's default)")
    p.add_argument("--batch", type=int, help="images per step (preset's default)")
    p.add_argument("--objects", type=int, default=10, help="object tokens per retrieved image")
    p.add_argument("--steps", type=int, default=40, help="interleaved pairs measured")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--profile", action="store_true", help="also split MAPS's time")
    p.add_argument("opts", nargs="*", help="config overrides, KEY VALUE ...")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config, size, batch = PRESETS[args.preset]
    config, size, batch = args.config or config, args.image_size or size, args.batch or batch
    cfg, base_model, maps_model = build_pair(config, args.device, args.opts)
    data = make_batch(cfg, batch, size, args.objects)
    n_base = sum(p.numel() for p in base_model.parameters())
    n_maps = sum(p.numel() for p in maps_model.parameters())
    print(f"config {config}  device {args.device}  threads {torch.get_num_threads()}  "
          f"batch {batch} x {size}px  k={cfg.MODEL.MAPS.NUM_RETRIEVED}  "
          f"objects/image {args.objects}")
    print(f"params: Mask2Former {n_base / 1e6:.3f}M  MAPS {n_maps / 1e6:.3f}M "
          f"(+{(n_maps - n_base) / 1e6:.3f}M)")
    times = measure(step_fn(base_model, data, args.device), step_fn(maps_model, data, args.device),
                    args.steps, args.warmup)
    ratios = [m / b for m, b in zip(times["maps"], times["base"])]
    q1, med, q3 = _quartiles(ratios)
    mb, mm = statistics.median(times["base"]), statistics.median(times["maps"])
    print(f"forward+backward, median of {args.steps}: Mask2Former {1000 * mb:.1f} ms  "
          f"MAPS {1000 * mm:.1f} ms")
    print(f"ratio MAPS / Mask2Former: median {med:.3f}  IQR [{q1:.3f}, {q3:.3f}]  "
          f"(ratio of medians {mm / mb:.3f})  target <= 1.05: "
          f"{'met' if med <= 1.05 else 'NOT met'}")
    if args.profile:
        profile_maps(maps_model, data, args.device, max(4, args.steps // 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
