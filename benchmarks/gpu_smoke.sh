#!/usr/bin/env bash
# One command for a CUDA machine: the paper's COCO Mask2Former and MAPS at 1024 px, per-GPU
# batch 2, AMP, on generated COCO-layout images; prints it/s, peak GPU memory, the MAPS /
# Mask2Former step-time ratio, the tiled CLIP encoder's images/s, neighbour-cache times
# (faiss-gpu when present) and which multi-scale deformable attention ran.
# Without CUDA it says so and exits 0. Options go to benchmarks/gpu_smoke.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" benchmarks/gpu_smoke.py "$@"
