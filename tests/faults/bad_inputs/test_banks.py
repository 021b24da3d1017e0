"""Missing or tampered banks, indexes and neighbour caches: refused in one line naming the file
(slow: the bank is built once per session by the ``bank`` fixture of tests/faults/conftest.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from .harness import REPO, Case, check_refused, maps_env, params

MAPS_TINY = REPO / "experiments" / "configs" / "synthetic" / "maps_tiny.yaml"


def _bank(ws: Path, bank: Path) -> Path:
    dst = ws / "bank"
    shutil.copytree(bank, dst)
    return dst


def _caches(ws: Path, bank: Path) -> Path:
    dst = ws / "neighbors"
    shutil.copytree(bank.parent / "neighbors", dst)
    return dst


def _info(b: Path, verify: bool = False):
    return ["memory", "info", "--bank", str(b), *(["--verify"] if verify else [])]


def _neighbors(ws: Path, b: Path, search: str = "exact"):
    return ["memory", "neighbors", "--bank", str(b), "--dataset", "synthetic_val", "--out",
            str(ws / "out" / "nb.jsonl"), "--k", "3", "--search", search]


def _train(ws: Path, b: Path, neighbors: Path):
    """A MAPS training on the bank as built (CLIP-grid tokens of ViT-Tiny-16 keys)."""
    return ["train", "--config", str(MAPS_TINY), "--output", str(ws / "run"), "--allow-random-weights",
            "SOLVER.MAX_ITER", "2", "MODEL.MAPS.MEMORY.BANK", str(b), "MODEL.MAPS.MEMORY.NEIGHBORS", str(neighbors),
            "MODEL.MAPS.MEMORY.DENSE", "clip", "MODEL.MAPS.MEMORY.KEY_ARCH", "ViT-Tiny-16"]


def _flip_bytes(path: Path, at: int = -8) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF  # same size, other content: only a hash can tell
    path.write_bytes(bytes(data))


# -- banks -----------------------------------------------------------------------------------------
def bank_tampered_tokens(ws, datasets_root, bank):
    b = _bank(ws, bank)
    _flip_bytes(b / "object_tokens.npy")
    return _info(b, verify=True)


def bank_tampered_keys(ws, datasets_root, bank):
    b = _bank(ws, bank)
    _flip_bytes(b / "scene_keys.npy")
    return _neighbors(ws, b)


def bank_manifest_not_json(ws, datasets_root, bank):
    b = _bank(ws, bank)
    (b / "manifest.json").write_text('{"format": "maps-memory-ba')
    return _info(b)


def bank_manifest_wrong_count(ws, datasets_root, bank):
    b = _bank(ws, bank)
    m = json.loads((b / "manifest.json").read_text())
    m["num_images"] = int(m["num_images"]) + 1
    (b / "manifest.json").write_text(json.dumps(m))
    return _info(b)


def bank_array_of_another_shape(ws, datasets_root, bank):
    b = _bank(ws, bank)
    keys = np.load(b / "scene_keys.npy")
    np.save(b / "scene_keys.npy", keys[:-1])
    return _info(b)


def bank_array_missing(ws, datasets_root, bank):
    b = _bank(ws, bank)
    (b / "object_offsets.npy").unlink()
    return _info(b)


def bank_pickled_array(ws, datasets_root, bank):
    b = _bank(ws, bank)
    np.save(b / "object_categories.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return _info(b)


def bank_path_is_a_file(ws, datasets_root, bank):
    f = ws / "bank"
    f.write_text("not a bank")
    return _neighbors(ws, f)


# -- indexes ----------------------------------------------------------------------------------------
def index_tampered(ws, datasets_root, bank):
    b = _bank(ws, bank)
    index = next(b.glob("*.faiss"))
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    return _neighbors(ws, b, "hnsw")


def index_garbage(ws, datasets_root, bank):
    b = _bank(ws, bank)
    index = next(b.glob("*.faiss"))
    index.write_bytes(b"\0" * index.stat().st_size)
    return _neighbors(ws, b, "hnsw")


# -- neighbour caches -------------------------------------------------------------------------------
def cache_truncated_line(ws, datasets_root, bank):
    b, nb = _bank(ws, bank), _caches(ws, bank)
    cache = nb / "synthetic_train.jsonl"
    lines = cache.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    cache.write_text("\n".join(lines) + "\n")
    return _train(ws, b, nb)


def cache_of_another_bank(ws, datasets_root, bank):
    b, nb = _bank(ws, bank), _caches(ws, bank)
    cache = nb / "synthetic_train.jsonl"
    lines = cache.read_text().splitlines()
    header = json.loads(lines[0])
    for key in list(header):
        if "sha" in key or "hash" in key or "manifest" in key:
            header[key] = "0" * 64
    lines[0] = json.dumps(header)
    cache.write_text("\n".join(lines) + "\n")
    return _train(ws, b, nb)


def cache_neighbor_not_in_bank(ws, datasets_root, bank):
    b, nb = _bank(ws, bank), _caches(ws, bank)
    cache = nb / "synthetic_val.jsonl"
    lines = cache.read_text().splitlines()
    row = json.loads(lines[1])
    row["neighbors"][0] = 987654321
    lines[1] = json.dumps(row)
    cache.write_text("\n".join(lines) + "\n")
    return _train(ws, b, nb)


def cache_missing(ws, datasets_root, bank):
    b, nb = _bank(ws, bank), _caches(ws, bank)
    (nb / "synthetic_val.jsonl").unlink()
    return _train(ws, b, nb)


#: the verification stamp a bank reader keeps in the bank (maps.memory): not a damage
STAMP = ["bank/.verified.json"]
BANK_CASES = [
    Case("bank: tampered object tokens (same size)", bank_tampered_tokens, "object_tokens.npy", slow=True, outputs=STAMP),
    Case("bank: tampered scene keys (same size)", bank_tampered_keys, "scene_keys.npy", slow=True, outputs=STAMP),
    Case("bank: manifest not JSON", bank_manifest_not_json, "manifest.json", slow=True, outputs=STAMP),
    Case("bank: manifest with another image count", bank_manifest_wrong_count, "manifest.json", slow=True, outputs=STAMP),
    Case("bank: array of another shape", bank_array_of_another_shape, "scene_keys.npy", slow=True, outputs=STAMP),
    Case("bank: array missing", bank_array_missing, "object_offsets.npy", slow=True, outputs=STAMP),
    Case("bank: pickled object array", bank_pickled_array, "object_categories.npy", slow=True, outputs=STAMP),
    Case("bank: path is a file", bank_path_is_a_file, "bank", slow=True, outputs=STAMP),
    Case("index: truncated", index_tampered, ".faiss", slow=True, outputs=STAMP),
    Case("index: zeroed", index_garbage, ".faiss", slow=True, outputs=STAMP),
    Case("cache: truncated line", cache_truncated_line, "synthetic_train.jsonl", slow=True, outputs=STAMP),
    Case("cache: header of another bank", cache_of_another_bank, "synthetic_train.jsonl", slow=True, outputs=STAMP),
    Case("cache: neighbour not in the bank", cache_neighbor_not_in_bank, "synthetic_val.jsonl", slow=True, outputs=STAMP),
    Case("cache: missing for a dataset", cache_missing, "synthetic_val", slow=True, outputs=STAMP),
]


@pytest.mark.parametrize("case", params(BANK_CASES))
def test_bank_index_and_cache_refusals(case, tmp_path, datasets_root, bank):
    args = case.setup(tmp_path, datasets_root, bank)
    check_refused(case, args, tmp_path, maps_env(datasets_root))
