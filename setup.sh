#!/usr/bin/env bash
# One command from a fresh machine (Python >= 3.10) to a working environment in .venv:
# the pinned stack, detectron2, and this package (editable, with dev extras).
# A second run with nothing changed only verifies the imports (seconds).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${MAPS_VENV:-.venv}
STAMP="$VENV/.maps-setup-stamp"
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)

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
"${PIP[@]}" install -q -e ".[dev]"

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
