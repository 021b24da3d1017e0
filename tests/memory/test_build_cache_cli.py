"""Sharded builds, the neighbour cache, the memory attacher and the CLI commands."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from maps.errors import MemoryBankError
from maps.memory.bank import MemoryBank
from maps.memory.build import build_bank, shard_ranges
from maps.memory.dataset import load_dataset_dicts
from maps.memory.retrieval import (MemoryAttacher, NeighborCache, compute_neighbors,
                                   write_neighbor_cache)
from maps.memory.tokens import MemoryTokens

TINY = dict(arch="ViT-Tiny-16", seed=3)  # as in conftest.py

ARRAYS = ("scene_keys", "object_tokens", "object_offsets", "object_categories",
          "object_areas", "object_segment_ids")


def test_bank_content(tiny_bank, tiny_dataset):
    dicts = load_dataset_dicts(tiny_dataset)
    assert tiny_bank.image_ids == [d["image_id"] for d in dicts]
    # one token per non-crowd segment, crowd segments left out
    want = [sum(1 for s in d["segments_info"] if not s["iscrowd"]) for d in dicts]
    assert np.diff(tiny_bank.arrays.object_offsets).tolist() == want
    assert tiny_bank.scene_keys.shape == (7, 64) and tiny_bank.arrays.object_tokens.shape[1] == 64
    np.testing.assert_allclose(np.linalg.norm(tiny_bank.scene_keys, axis=1), 1, atol=1e-5)
    assert (tiny_bank.path / "index.faiss").is_file()


def test_shard_ranges_fall_on_batches():
    rs = shard_ranges(10, 3, 3)
    assert [(r.start, r.stop) for r in rs] == [(0, 3), (3, 6), (6, 10)]
    assert sum(len(r) for r in shard_ranges(7, 10, 2)) == 7


def test_sharded_build_equals_unsharded_and_resumes(tiny_bank, tiny_dataset, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "sharded"
    bank = build_bank(tiny_dataset, out, dense="tiledclip", batch_size=3, shards=3,
                      executor="debug", index="flat", progress=False, **TINY)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(bank.arrays, name), getattr(tiny_bank.arrays, name))
    assert bank.image_ids == tiny_bank.image_ids
    assert bank.key_encoder == tiny_bank.key_encoder
    shards = sorted(p.name for p in (out / "shards").glob("shard-*"))
    assert shards == [f"shard-{i:05d}-of-00003" for i in range(3)]
    # a rerun with one shard gone redoes only that shard
    import shutil

    import maps.memory.build as build_mod
    shutil.rmtree(out / "shards" / shards[1])
    calls = []
    real = build_mod.build_shard
    monkeypatch.setattr(build_mod, "build_shard",
                        lambda dicts, *a, **k: calls.append(len(dicts)) or real(dicts, *a, **k))
    bank2 = build_bank(tiny_dataset, out, dense="tiledclip", batch_size=3, shards=3,
                       executor="debug", index="flat", progress=False, **TINY)
    assert calls == [3]
    np.testing.assert_array_equal(bank2.arrays.object_tokens, tiny_bank.arrays.object_tokens)


@pytest.mark.slow  # two fresh processes importing torch + detectron2: ~30-60 s on 2 cores
def test_sharded_build_local_executor(tiny_bank, tiny_dataset, tmp_path):
    bank = build_bank(tiny_dataset, tmp_path / "local", dense="tiledclip", batch_size=3,
                      shards=2, executor="local", index="flat", progress=False, **TINY)
    for name in ARRAYS:
        np.testing.assert_allclose(getattr(bank.arrays, name), getattr(tiny_bank.arrays, name),
                                   atol=1e-6)


def test_neighbor_cache_round_trip_and_attacher(tiny_bank, tiny_dataset, tmp_path):
    dicts = load_dataset_dicts(tiny_dataset)
    ids, nn, scores = compute_neighbors(tiny_bank, dicts, 3, progress=False)
    path = write_neighbor_cache(tmp_path / "nn.jsonl", tiny_bank, ids, nn, scores, tiny_dataset)
    cache = NeighborCache(path)
    assert len(cache) == 7 and cache.header["k"] == 3
    keys = np.asarray(tiny_bank.scene_keys)
    for i, iid in enumerate(ids):
        got, s = cache[iid]
        assert got == nn[i] and iid not in got
        # exact: the 3 best other images by inner product
        sims = keys @ keys[i]
        sims[i] = -np.inf
        assert got == [tiny_bank.image_ids[j] for j in np.argsort(-sims)[:3]]
        np.testing.assert_allclose(s, np.sort(sims)[::-1][:3], atol=1e-5)
    att = MemoryAttacher(tiny_bank, cache, 2, query_cls=True)
    mem = att(dicts[0])
    assert mem["scene"].shape == (2, 64) and mem["query_cls"].shape == (64,)
    np.testing.assert_allclose(mem["scene"][0].numpy(),
                               keys[tiny_bank.row(cache[ids[0]][0][0])])
    assert set(mem["object_slot"].tolist()) <= {0, 1}
    MemoryTokens.collate([mem, att(dicts[1])])
    with pytest.raises(MemoryBankError, match="3 neighbours .* 5 needed"):
        MemoryAttacher(tiny_bank, cache, 5)(dicts[0])


def test_neighbor_cache_corrupt_line_is_named(tmp_path):
    p = tmp_path / "nn.jsonl"
    header = '{"format": "maps-neighbors", "version": 1}\n'
    p.write_text(header + '{"image_id": 1, "neighbors": [2, 3], "scores": [0.9, 0.5]}\n'
                 '{"image_id": 2, "neighbors": [1], "scores": [0.9]\n')
    with pytest.raises(MemoryBankError, match=r"nn.jsonl:3: not valid JSON"):
        NeighborCache(p)
    p.write_text(header + '{"image_id": 1, "neighbors": [1, 3], "scores": [0.9, 0.5]}\n')
    with pytest.raises(MemoryBankError, match=r"nn.jsonl:2: .*lists itself"):
        NeighborCache(p)


def test_cli_neighbors_viz_and_errors(tiny_bank, tiny_dataset, tmp_path):
    from maps.cli import main

    runner = CliRunner()
    out = tmp_path / "nn.jsonl"
    r = runner.invoke(main, ["memory", "neighbors", "--bank", str(tiny_bank.path), "--dataset",
                             tiny_dataset, "--out", str(out), "--k", "2"])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[1])["image_id"] == 100
    png = tmp_path / "fig.png"
    r = runner.invoke(main, ["viz", "retrievals", "--bank", str(tiny_bank.path), "--dataset",
                             tiny_dataset, "--image", "102", "--out", str(png), "--k", "3"])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(main, ["memory", "info", "--bank", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "memory bank not found" in r.output


def test_cli_build(tiny_dataset, tmp_path):
    from maps.cli import main

    r = CliRunner().invoke(main, ["memory", "build", "--dataset", tiny_dataset, "--out",
                                  str(tmp_path / "b"), "--arch", "ViT-Tiny-32", "--dense",
                                  "maskclip", "--index", "hnsw", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    bank = MemoryBank(tmp_path / "b", verify=True)
    assert bank.scene_keys.dtype == np.float16 and bank.dense_encoder["mode"] == "maskclip"


def test_attacher_online_matches_cache_and_from_config(tiny_bank, tiny_dataset, tmp_path):
    from maps.config import get_maps_cfg

    dicts = load_dataset_dicts(tiny_dataset)
    ids, nn, scores = compute_neighbors(tiny_bank, dicts, 3, progress=False)
    cache_path = write_neighbor_cache(tmp_path / "nn.jsonl", tiny_bank, ids, nn, scores,
                                      tiny_dataset)
    cfg = get_maps_cfg()
    mem = cfg.MODEL.MAPS.MEMORY
    mem.BANK, mem.NEIGHBORS, mem.KEY_ARCH, mem.SEED = str(tiny_bank.path), str(cache_path), \
        "ViT-Tiny-16", 3
    cfg.MODEL.MAPS.NUM_RETRIEVED = 3
    cached = MemoryAttacher(cfg)
    mem.ONLINE = True
    online = MemoryAttacher(cfg)
    assert online.neighbors is None
    for d in dicts:
        assert online.neighbor_ids(d) == cached.neighbor_ids(d) == nn[ids.index(d["image_id"])]
    mem.SEED = 4  # another random init than the bank's: refused, both identities named
    with pytest.raises(MemoryBankError, match="seed 3.*seed 4"):
        MemoryAttacher(cfg)
    mem.SEED, mem.DENSE = 3, "maskclip"
    with pytest.raises(MemoryBankError, match="'tiledclip' object tokens"):
        MemoryAttacher(cfg)
