"""`maps memory neighbors --search hnsw`: an image of the memory's own set never retrieves
itself (its object values are pooled under its ground-truth masks), but does retrieve an
identical image that is another memory entry."""
from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from pathlib import Path

import faiss
import pytest
from click.testing import CliRunner


def _memory_conftest():
    """This folder's conftest.py (its dataset writer), under a name of its own: a plain
    ``import conftest`` could find another folder's conftest in a full run."""
    spec = importlib.util.spec_from_file_location(
        "memory_tests_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

SIZES = [(48, 64), (48, 64), (64, 48), (40, 90), (56, 56), (64, 80), (50, 70), (72, 40)]


@pytest.fixture(scope="module")
def twin_dataset(tmp_path_factory) -> str:
    """Eight images; the second is a byte copy of the first under another id (its twin)."""
    helpers = _memory_conftest()
    root = tmp_path_factory.mktemp("twins")
    helpers.write_panoptic_dataset(root, SIZES, seed=5)
    shutil.copy(root / "images" / "000000.jpg", root / "images" / "000001.jpg")
    shutil.copy(root / "panoptic" / "000000.png", root / "panoptic" / "000001.png")
    meta = json.loads((root / "panoptic.json").read_text())
    meta["annotations"][1]["segments_info"] = meta["annotations"][0]["segments_info"]
    (root / "panoptic.json").write_text(json.dumps(meta))
    return helpers.register(root, f"twins_{uuid.uuid4().hex[:6]}")


def _read_cache(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], {rec["image_id"]: rec for rec in lines[1:]}


def test_hnsw_neighbors_exclude_the_image_itself_only(twin_dataset, tmp_path):
    from maps.cli import main

    runner = CliRunner()
    bank = tmp_path / "bank"
    r = runner.invoke(main, ["memory", "build", "--dataset", twin_dataset, "--out", str(bank),
                             "--arch", "ViT-Tiny-32", "--dense", "clip", "--index", "hnsw",
                             "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert isinstance(faiss.read_index(str(bank / "index.faiss")), faiss.IndexHNSWFlat)

    ids = list(range(100, 100 + len(SIZES)))
    results = {}
    for search in ("hnsw", "exact"):
        out = tmp_path / f"{search}.jsonl"
        r = runner.invoke(main, ["memory", "neighbors", "--bank", str(bank), "--dataset",
                                 twin_dataset, "--out", str(out), "--k", str(len(SIZES) - 1),
                                 "--search", search])
        assert r.exit_code == 0, r.output
        header, records = _read_cache(out)
        assert header["k"] == len(SIZES) - 1 and sorted(records) == ids
        for iid, rec in records.items():
            assert iid not in rec["neighbors"], (search, iid)
            assert sorted(rec["neighbors"]) == [i for i in ids if i != iid]  # all the others
            assert rec["scores"] == sorted(rec["scores"], reverse=True)
        # the twins (same pixels, different ids) retrieve each other first, at similarity 1
        for me, twin in ((100, 101), (101, 100)):
            assert records[me]["neighbors"][0] == twin
            assert records[me]["scores"][0] == pytest.approx(1.0, abs=1e-4)
        results[search] = {i: rec["neighbors"] for i, rec in records.items()}
    assert {i: set(n) for i, n in results["hnsw"].items()} == {
        i: set(n) for i, n in results["exact"].items()}
