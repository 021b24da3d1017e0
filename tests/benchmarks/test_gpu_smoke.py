"""benchmarks/gpu_smoke.sh: without CUDA it says so and exits 0; on the CPU (tiny) the same
steps run end to end, so a GPU session spends its minutes measuring, not debugging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gpu_smoke: no CUDA device") and "nothing measured" in r.stdout


@pytest.mark.slow  # ViT-B/16 and two R50 models on the CPU: about a minute on 2 cores
def test_cpu_run_of_every_step(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_smoke

    monkeypatch.setenv("MAPS_WEIGHTS", str(tmp_path / "weights"))
    args = ["--device", "cpu", "--size", "128", "--batch", "1", "--iters", "2", "--warmup", "1",
            "--train-images", "8", "--workers", "0", "--coco-keys", "2000",
            "--workdir", str(tmp_path / "work")]
    assert gpu_smoke.main(args) == 0
    out = json.loads((tmp_path / "work" / "gpu_smoke.json").read_text())
    for name in ("mask2former", "maps"):
        assert out[name]["iterations"] == 2 and out[name]["ms_deform_attn"] == "pytorch"
    assert out["maps_over_mask2former_step"] > 0 and out["tiledclip_images_per_s"] > 0
    assert "skipped" in str(out["coco_scale_faiss_gpu_s"]) or "not installed" in str(
        out["coco_scale_faiss_gpu_s"])
