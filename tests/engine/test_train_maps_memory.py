"""MAPS trains on the synthetic dataset from a bank built here (issue 4).

A bank is built with the tiny CLIP encoder over a tiny synthetic training set, neighbour
caches are written for the training and the evaluation set, and maps_tiny trains a few
iterations: the run records the bank it read, and the retrieved tokens reach the decoder's
memory fusion. A model configured with another encoder than the bank's is refused before
training starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

MAPS_TINY = "experiments/configs/synthetic/maps_tiny.yaml"
K = 3  # MODEL.MAPS.NUM_RETRIEVED: 6 memory images, each excluded from its own neighbours


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """(bank dir, neighbour-cache dir) for datasets ``tmem_train`` / ``tmem_val``."""
    from maps.data import generate_synthetic_dataset, register_synthetic
    from maps.memory.build import build_bank
    from maps.memory.dataset import load_dataset_dicts
    from maps.memory.encoders import build_key_encoder
    from maps.memory.retrieval import compute_neighbors, write_neighbor_cache

    tmp = tmp_path_factory.mktemp("maps_memory")
    generate_synthetic_dataset(tmp / "synthetic", 6, 2, size=64, seed=2, progress=False)
    register_synthetic("tmem", str(tmp / "synthetic"))
    bank = build_bank("tmem_train", tmp / "bank", encoder="clip", arch="ViT-Tiny-16",
                      dense="tiledclip", seed=0, index="flat", progress=False)
    key = build_key_encoder("clip", "ViT-Tiny-16", None, 0, device="cpu")
    (tmp / "nb").mkdir()
    for name in ("tmem_train", "tmem_val"):
        ids, nn, scores = compute_neighbors(bank, load_dataset_dicts(name), 5, key_encoder=key,
                                            progress=False)
        write_neighbor_cache(tmp / "nb" / f"{name}.jsonl", bank, ids, nn, scores, name)
    return tmp / "bank", tmp / "nb"


def _opts(bank: Path, nb: Path, out: Path, *extra: str):
    return ["OUTPUT_DIR", str(out), "DATASETS.TRAIN", "('tmem_train',)",
            "DATASETS.TEST", "('tmem_val',)", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()",
            "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0",
            "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "MODEL.MAPS.NUM_RETRIEVED", str(K), "MODEL.MAPS.POOL_SIZE", str(K),
            "MODEL.MAPS.MEMORY.BANK", str(bank), "MODEL.MAPS.MEMORY.NEIGHBORS", str(nb),
            *extra]


def test_maps_trains_from_a_bank_built_here(memory, tmp_path, monkeypatch):
    from maps.engine.train import train
    from maps.memory.bank import MemoryBank
    from maps.modeling.build import load_config
    from maps.modeling.memory_fusion import MemoryFusion

    bank_dir, nb = memory
    seen = []  # (training?, MemoryTokens) at every forward of the memory fusion
    real_prepare = MemoryFusion.prepare

    def spy_prepare(self, tokens):
        seen.append((self.training, tokens))
        return real_prepare(self, tokens)

    monkeypatch.setattr(MemoryFusion, "prepare", spy_prepare)
    out = tmp_path / "run"
    final = train(load_config(MAPS_TINY, _opts(bank_dir, nb, out)))

    # the run names the bank it used: path and the manifest's sha256
    record = json.loads((out / "memory.json").read_text())
    assert record["bank"] == str(bank_dir.resolve())
    assert record["manifest_sha256"] == hashlib.sha256(
        (bank_dir / "manifest.json").read_bytes()).hexdigest()
    assert record["neighbors"] == str(nb.resolve())
    assert json.loads((out / "final.json").read_text()) == final
    assert final["iteration"] == 3 and 0.0 <= final["PQ"] <= 100.0

    # retrieved tokens reached the model: 3 training steps of 2 images, then 2 val images,
    # each with K scene tokens that are bank rows and a non-empty object memory
    train_calls = [m for training, m in seen if training]
    eval_calls = [m for training, m in seen if not training]
    assert len(train_calls) == 3 and len(eval_calls) == 2
    bank_keys = torch.from_numpy(np.array(MemoryBank(bank_dir).scene_keys, np.float32))
    for m in train_calls + eval_calls:
        assert m is not None
        assert (~m.scene_mask).sum(1).tolist() == [K] * m.scene.shape[0]
        assert ((~m.object_mask).sum(1) > 0).all()
        assert m.scene.shape[-1] == 64 and m.object.shape[-1] == 64
        tokens = m.scene[~m.scene_mask]
        distance = torch.cdist(tokens, bank_keys).min(dim=1).values
        assert (distance < 1e-5).all()
        # the K slots of an image are K distinct memory images
        for row in m.scene:
            assert torch.cdist(row, row).fill_diagonal_(1).min() > 1e-6


@pytest.mark.parametrize("override, words", [
    (("MODEL.MAPS.MEMORY.SEED", "1"), "built with key encoder"),
    (("MODEL.MAPS.MEMORY.KEY_ARCH", "ViT-Tiny-32"), "built with key encoder"),
    (("MODEL.MAPS.MEMORY.DENSE", "maskclip"), "MODEL.MAPS.MEMORY.DENSE"),
])
def test_bank_of_another_encoder_is_refused_before_training(memory, tmp_path, override, words):
    """The CLI prints one line naming the bank and exits 2; no iteration has run."""
    from maps.cli import main

    bank_dir, nb = memory
    out = tmp_path / "run"
    opts = _opts(bank_dir, nb, out, *override)[2:]  # OUTPUT_DIR comes from --output
    result = CliRunner().invoke(main, ["train", "--config", MAPS_TINY, "--output", str(out),
                                       *opts])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert words in lines[-1] and str(bank_dir) in lines[-1], result.output
    assert "Traceback" not in result.output
    assert not (out / "metrics.json").exists()
    assert not list(out.glob("model_*.pth")) and not (out / "final.json").exists()
