"""GPU smoke benchmark: the paper's COCO models at the paper's resolution, on one CUDA device.

What it does (benchmarks/gpu_smoke.sh runs it):

1. writes a synthetic dataset in COCO's panoptic layout at ``--size`` (1024: the COCO
   recipe's large-scale-jitter crop) with ``maps.data.synthetic``;
2. builds the MAPS memory of its training split with the paper's encoders (CLIP
   ViT-B-16-quickgelu keys, TiledCLIP object tokens; the cached OpenAI weights when
   ``maps weights`` has them, else random: speed does not depend on the values) and reports
   the tiled CLIP encoder's throughput in images/s;
3. times the neighbour cache: maps' exact search on the bank, and at COCO scale (118,000
   keys of width 512) maps' blocked top-k on the GPU and faiss-gpu's exact search when
   faiss has GPUs;
4. trains ``coco/maskformer2_R50_bs16_50ep`` and ``coco/maps_R50_bs16_50ep`` for ``--iters``
   iterations each with AMP at the per-GPU batch of the paper's recipe (16 images on 8 GPUs:
   2), through maps' own data loader (LSJ at 1024, memory attached) and optimizer (AdamW,
   full-model clipping), and prints iterations/s, step time, peak GPU memory, the MAPS /
   Mask2Former step-time ratio and which multi-scale deformable attention ran (Mask2Former's
   compiled CUDA op or the PyTorch grid_sample path).

Without CUDA it says so and exits 0 (``--device cpu`` runs the same steps, tiny, to check
the script itself). Results are also written as JSON to ``<workdir>/gpu_smoke.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"mask2former": "experiments/configs/coco/maskformer2_R50_bs16_50ep.yaml",
           "maps": "experiments/configs/coco/maps_R50_bs16_50ep.yaml"}
DATASET = "gpusmoke"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (script check)")
    p.add_argument("--size", type=int, default=1024, help="image side (COCO LSJ: 1024)")
    p.add_argument("--batch", type=int, default=2, help="images per GPU (paper: 16 on 8 GPUs)")
    p.add_argument("--iters", type=int, default=300, help="timed iterations per model")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="data loader workers")
    p.add_argument("--coco-keys", type=int, default=118_000,
                   help="bank size of the COCO-scale neighbour timing (0: skip)")
    p.add_argument("--workdir", default=os.environ.get("MAPS_GPU_SMOKE_DIR", "/tmp/maps_gpu_smoke"))
    args = p.parse_args(argv)
    if args.train_images < 6:
        p.error("--train-images must be >= 6 (each image retrieves k = 5 others)")
    return args


def cuda_missing(device: str) -> Optional[str]:
    """Why CUDA cannot be used (None when it can, or when the CPU was asked for)."""
    import torch

    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (CPU-only build)"
        return (f"no CUDA device visible to torch {torch.__version__} (CUDA build: {build}); "
                "run this on a GPU node")
    return None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_dataset(args: argparse.Namespace) -> Path:
    from maps.data import register_synthetic
    from maps.data.synthetic import generate_synthetic_dataset

    root = Path(args.workdir) / f"synthetic-{args.size}-{args.train_images}"
    if not (root / "panoptic_val.json").is_file():
        generate_synthetic_dataset(root, args.train_images, max(2, args.batch), args.size, 0,
                                   overwrite=True, workers=min(8, os.cpu_count() or 1),
                                   progress=False)
    register_synthetic(DATASET, str(root))
    return root


def _clip_weights() -> Optional[str]:
    from maps.weights import cache_status

    return "clip-vit-b16-openai" if cache_status("clip-vit-b16-openai").verified else None


def build_memory(args: argparse.Namespace, out: Dict[str, Any]) -> Dict[str, str]:
    """Bank + neighbour cache of the synthetic train split; encoder and search timings."""
    import numpy as np

    from maps.memory.build import build_bank
    from maps.memory.dataset import load_dataset_dicts, read_image
    from maps.memory.encoders import build_dense_encoder
    from maps.memory.retrieval import compute_neighbors, write_neighbor_cache

    weights = _clip_weights()
    out["memory_encoder_weights"] = weights or "random (speed only)"
    dicts = load_dataset_dicts(f"{DATASET}_train")
    images = [read_image(d) for d in dicts[:16]]
    enc = build_dense_encoder("tiledclip", "ViT-B-16-quickgelu", weights=weights,
                              device=args.device)
    enc.encode(images[:2])  # warm-up (cudnn autotune, lazy init)
    _sync(args.device)
    t0 = time.perf_counter()
    for i in range(0, len(images), 8):
        enc.encode(images[i:i + 8])
    _sync(args.device)
    out["tiledclip_images_per_s"] = round(len(images) / (time.perf_counter() - t0), 2)

    bank_dir = Path(args.workdir) / "bank"
    t0 = time.perf_counter()
    bank = build_bank(f"{DATASET}_train", bank_dir, encoder="clip", arch="ViT-B-16-quickgelu",
                      dense="tiledclip", weights=weights, batch_size=8, index="hnsw",
                      progress=False)
    out["bank_build_s"] = round(time.perf_counter() - t0, 2)
    out["bank_build_images_per_s"] = round(len(bank) / out["bank_build_s"], 2)
    caches = {}
    for split in ("train", "val"):
        name = f"{DATASET}_{split}"
        t0 = time.perf_counter()
        ids, nn, scores = compute_neighbors(bank, load_dataset_dicts(name), 10, progress=False,
                                            key_encoder=_key_encoder(weights, args.device))
        out[f"neighbors_{split}_s"] = round(time.perf_counter() - t0, 3)
        caches[split] = str(write_neighbor_cache(Path(args.workdir) / f"nn_{split}.jsonl", bank,
                                                 ids, nn, scores, name))
    if args.coco_keys:
        coco_scale_search(args, out, np)
    return {"bank": str(bank_dir), **caches}


def _key_encoder(weights: Optional[str], device: str):
    from maps.memory.encoders import build_key_encoder

    return build_key_encoder("clip", "ViT-B-16-quickgelu", weights=weights, device=device)


def coco_scale_search(args: argparse.Namespace, out: Dict[str, Any], np) -> None:
    """All-pairs k=5 neighbours of a COCO-sized key set (random unit vectors: the timing
    does not depend on the values; recall is benchmarks/retrieval.py's business)."""
    from maps.memory.index import blocked_topk

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.coco_keys, 512)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    own = np.arange(len(keys))
    _sync(args.device)
    t0 = time.perf_counter()
    blocked_topk(keys, keys, 5, exclude=own, first_pass="fp32", device=args.device)
    _sync(args.device)
    out["coco_scale_blocked_topk_s"] = round(time.perf_counter() - t0, 2)
    try:
        import faiss
    except ImportError:
        out["coco_scale_faiss_gpu_s"] = "faiss not installed"
        return
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        out["coco_scale_faiss_gpu_s"] = "faiss-cpu build (no GPU support): skipped"
        return
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, keys.shape[1])
    index.add(keys)
    t0 = time.perf_counter()
    index.search(keys, 6)
    out["coco_scale_faiss_gpu_s"] = round(time.perf_counter() - t0, 2)


def train_config(args: argparse.Namespace, name: str, memory: Dict[str, str]):
    from maps.data import SYNTHETIC_CATEGORIES
    from maps.modeling.build import load_config

    opts = ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(len(SYNTHETIC_CATEGORIES)),
            "DATASETS.TRAIN", f"('{DATASET}_train',)", "DATASETS.TEST", f"('{DATASET}_val',)",
            "SOLVER.IMS_PER_BATCH", str(args.batch), "INPUT.IMAGE_SIZE", str(args.size),
            "SOLVER.AMP.ENABLED", str(args.device.startswith("cuda")),
            "DATALOADER.NUM_WORKERS", str(args.workers), "SEED", "0"]
    if name == "maps":
        opts += ["MODEL.MAPS.MEMORY.BANK", memory["bank"],
                 "MODEL.MAPS.MEMORY.NEIGHBORS", memory["train"],
                 "MODEL.MAPS.MEMORY.WEIGHTS", _clip_weights() or ""]
    return load_config(ROOT / CONFIGS[name], opts)


def time_training(args: argparse.Namespace, name: str, memory: Dict[str, str]) -> Dict[str, Any]:
    """``--warmup`` + ``--iters`` AMP training steps of one model through maps' loader and
    optimizer (as detectron2's AMPTrainer steps: scaled backward, unscale, clip, step)."""
    import torch

    import maps.modeling  # noqa: F401
    from maps.engine.optim import build_optimizer
    from maps.engine.trainer import MAPSTrainer
    from maps.modeling.build import build_model
    from maps.modeling.pixel_decoder.ms_deform_attn import MSDeformAttn

    cfg = train_config(args, name, memory)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    amp = bool(cfg.SOLVER.AMP.ENABLED)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loader = iter(MAPSTrainer.build_train_loader(cfg))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    steps, totals = [], []
    for i in range(args.warmup + args.iters):
        t_start = time.perf_counter()
        batch = next(loader)
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=torch.device(args.device).type, enabled=amp):
            losses = model(batch)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(args.device)
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
            totals.append(time.perf_counter() - t_start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss at iteration {i}")
    backends = sorted({m.last_backend for m in model.modules()
                       if isinstance(m, MSDeformAttn) and m.last_backend})
    result = {"iterations": len(steps), "iters_per_s": round(len(totals) / sum(totals), 3),
              "step_s_median": round(statistics.median(steps), 4),
              "data_wait_s_median": round(statistics.median(
                  t - s for t, s in zip(totals, steps)), 4),
              "ms_deform_attn": ",".join(backends) or "none", "amp": amp,
              "batch_per_gpu": args.batch, "image_size": args.size,
              "final_loss": float(loss.item())}
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    del model, optimizer, loader
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def report(out: Dict[str, Any]) -> str:
    lines = [f"device: {out['device']}"]
    for name in ("mask2former", "maps"):
        r = out[name]
        mem = f", peak GPU memory {r['peak_gpu_memory_gib']} GiB" if "peak_gpu_memory_gib" in r \
            else ""
        lines.append(f"{name}: {r['iters_per_s']} it/s, step {r['step_s_median']} s (median of "
                     f"{r['iterations']}){mem}, multi-scale deformable attention: "
                     f"{r['ms_deform_attn']}")
    lines.append(f"MAPS / Mask2Former step time: {out['maps_over_mask2former_step']}")
    lines.append(f"tiled CLIP encoder: {out['tiledclip_images_per_s']} images/s; bank build "
                 f"{out['bank_build_images_per_s']} images/s ({out['memory_encoder_weights']})")
    lines.append(f"neighbour cache: train {out['neighbors_train_s']} s; COCO scale "
                 f"({out.get('coco_keys')} keys) maps blocked top-k "
                 f"{out.get('coco_scale_blocked_topk_s', '-')} s, faiss-gpu "
                 f"{out.get('coco_scale_faiss_gpu_s', '-')}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    why = cuda_missing(args.device)
    if why is not None:
        print(f"gpu_smoke: {why}: nothing measured")
        return 0
    import torch

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    out: Dict[str, Any] = {"device": torch.cuda.get_device_name(0)
                           if args.device.startswith("cuda") else "cpu",
                           "torch": torch.__version__, "coco_keys": args.coco_keys}
    make_dataset(args)
    memory = build_memory(args, out)
    for name in ("mask2former", "maps"):
        out[name] = time_training(args, name, memory)
    out["maps_over_mask2former_step"] = round(
        out["maps"]["step_s_median"] / out["mask2former"]["step_s_median"], 3)
    from maps.io import atomic_write_json

    atomic_write_json(Path(args.workdir) / "gpu_smoke.json", out)
    print(report(out))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
