#!/usr/bin/env bash
# One command from a fresh machine (Python >= 3.10) to a working environment in .venv:
# the tested stack (constraints.txt), detectron2, and this package (editable, with its test
# extras and one FAISS build: faiss-gpu where an NVIDIA driver answers, else faiss-cpu;
# MAPS_FAISS=cpu|gpu chooses).
# A second run with nothing changed only verifies the imports (seconds).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${MAPS_VENV:-.venv}
STAMP="$VENV/.maps-setup-stamp"
if [[ -z "${MAPS_FAISS:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MAPS_FAISS=gpu; else MAPS_FAISS=cpu; fi
fi
[[ "$MAPS_FAISS" == cpu || "$MAPS_FAISS" == gpu ]] || { echo "MAPS_FAISS must be cpu or gpu, not '$MAPS_FAISS'" >&2; exit 2; }
want=$( (cat pyproject.toml setup.sh constraints.txt; echo "$MAPS_FAISS") | sha256sum | cut -d' ' -f1)

check() {
  "$VENV/bin/python" - <<'PY'
import detectron2, torch, torchvision, faiss, open_clip, timm, wandb, optuna, submitit, scipy, pycocotools, maps
from detectron2.modeling import build_resnet_backbone  # noqa: F401
print(f"maps ready: torch {torch.__version__}, detectron2 {detectron2.__version__}, faiss {faiss.__version__}")
PY
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && check 2>/dev/null; then
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=23" setuptools wheel
other=$([[ "$MAPS_FAISS" == gpu ]] && echo faiss-cpu || echo faiss-gpu-cu12)
# the two builds install the same `faiss` module: never both
"${PIP[@]}" uninstall -q -y "$other" >/dev/null 2>&1 || true
"${PIP[@]}" install -q -c constraints.txt -e ".[dev,$MAPS_FAISS]"

# detectron2: keep one that imports already (a cluster's own build, e.g. via PYTHONPATH or
# a site package); else the sal-detectron2 wheel (upstream main, tagged cp310) unpacked by
# PyPA's installer, which does not check tags. Its compiled _C is skipped at import on other
# Pythons; Mask2Former needs none of those ops.
if ! "$VENV/bin/python" -c "import detectron2.modeling" 2>/dev/null; then
  tmp=$(mktemp -d)
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 \
      -d "$tmp" sal-detectron2==0.7.2
  "$VENV/bin/python" -m installer --no-compile-bytecode "$tmp"/sal_detectron2-*.whl
  rm -rf "$tmp"
fi

check
echo "$want" > "$STAMP"
