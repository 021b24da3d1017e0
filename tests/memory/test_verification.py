"""Runs verify the memory they read before step 0 (issue 12 item 5).

Every bank array and the FAISS index must match the sha256 in the bank's manifest (hashed in
full once, then trusted while size, mtime and ctime stay the same: ``.verified.json``); a
malformed manifest, an index the manifest has no hash for, and a neighbour cache without its
header are each refused in one line naming the file (and the key).
"""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from detectron2.config import CfgNode

import maps.memory.bank as bank_mod
from maps.errors import MemoryBankError
from maps.io import file_sha256
from maps.memory.bank import VERIFIED, BankArrays, MemoryBank, write_bank
from maps.memory.dataset import load_dataset_dicts
from maps.memory.index import IndexParams, load_or_build_index
from maps.memory.retrieval import NeighborCache, compute_neighbors, write_neighbor_cache
from maps.memory.wiring import verify_memory

KEY_ID = {"backbone": "clip", "arch": "A", "seed": 0, "weights_sha256": None, "dim": 4}
DENSE_ID = dict(KEY_ID, mode="tiledclip")
MAPS_TINY = "experiments/configs/synthetic/maps_tiny.yaml"


def _bank(tmp_path, name="b", index=True, seed=0) -> MemoryBank:
    """A 5-image bank written directly (no encoders), with a flat index unless ``index=False``."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(5, 4)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    counts = [2, 0, 3, 1, 1]
    T = sum(counts)
    arrays = BankArrays(image_ids=list(range(10, 15)), file_names=[f"{i}.jpg" for i in range(5)],
                        scene_keys=keys, object_tokens=rng.normal(size=(T, 3)).astype(np.float32),
                        object_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                        object_categories=np.arange(T), object_areas=np.full(T, 5),
                        object_segment_ids=np.arange(1, T + 1))
    write_bank(tmp_path / name, arrays, dataset="d", key_encoder=KEY_ID, dense_encoder=DENSE_ID)
    bank = MemoryBank(tmp_path / name)
    if index:
        load_or_build_index(bank.path, bank.scene_keys, IndexParams("flat"))
        bank = MemoryBank(tmp_path / name)
    return bank


def _cache(bank: MemoryBank, path, k=2):
    """An exact neighbour cache of the bank's own images against the bank."""
    keys = np.asarray(bank.scene_keys)
    sims = keys @ keys.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :k]
    nn = [[bank.image_ids[j] for j in row] for row in order]
    scores = [sims[i, row] for i, row in enumerate(order)]
    return write_neighbor_cache(path, bank, bank.image_ids, nn, scores, "d")


def _cfg(bank, neighbors, online=False) -> CfgNode:
    return CfgNode({"MODEL": {"MAPS": {"MEMORY": {"BANK": str(bank), "NEIGHBORS": str(neighbors),
                                                  "ONLINE": online}}}})


def _flip_last_byte(path, keep_mtime=True):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    if keep_mtime:  # as a careless copy or a restore would leave it
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def count_hashes(monkeypatch):
    hashed = []
    real = bank_mod.file_sha256

    def counting(path):
        hashed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(bank_mod, "file_sha256", counting)
    return hashed


def test_the_manifest_records_the_index_sha256_when_it_is_built(tmp_path):
    bank = _bank(tmp_path)
    record = bank.manifest["index"]
    assert record["file"] == "index.faiss" and record["ntotal"] == 5
    assert record["sha256"] == file_sha256(bank.path / "index.faiss")
    assert record["params"]["kind"] == "flat"
    # another kind rebuilds the index, and the record follows it
    load_or_build_index(bank.path, bank.scene_keys, IndexParams("hnsw", M=8))
    again = MemoryBank(bank.path).manifest["index"]
    assert again["params"]["kind"] == "hnsw" and again["sha256"] == file_sha256(bank.path / "index.faiss")


def test_every_file_is_hashed_once_then_again_only_when_it_changes(tmp_path, count_hashes):
    bank = _bank(tmp_path)
    cache = _cache(bank, tmp_path / "nb.jsonl")
    count_hashes.clear()  # (the build hashed them as it wrote them)
    record = verify_memory(_cfg(bank.path, cache), ["d"])
    assert sorted(count_hashes) == sorted([f"{n}.npy" for n in bank_mod.ARRAY_NAMES] + ["index.faiss"])
    assert record["bank"] == str(bank.path.resolve()) and record["neighbors"] == str(cache.resolve())
    verified = json.loads((bank.path / VERIFIED).read_text())["files"]
    assert verified["index.faiss"]["sha256"] == bank.manifest["index"]["sha256"]
    assert {"size", "mtime_ns", "ctime_ns"} <= set(verified["scene_keys.npy"])
    count_hashes.clear()
    verify_memory(_cfg(bank.path, cache), ["d"])  # the next run: nothing changed, nothing hashed
    assert count_hashes == []
    os.utime(bank.path / "object_areas.npy")      # touched, same bytes: hashed again, accepted
    verify_memory(_cfg(bank.path, cache), ["d"])
    assert count_hashes == ["object_areas.npy"]


@pytest.mark.parametrize("name", ["object_tokens.npy", "index.faiss"])
def test_a_changed_file_is_one_line_naming_it_even_with_its_mtime_restored(tmp_path, name):
    bank = _bank(tmp_path)
    cache = _cache(bank, tmp_path / "nb.jsonl")
    verify_memory(_cfg(bank.path, cache), ["d"])  # verified and cached
    _flip_last_byte(bank.path / name)
    with pytest.raises(MemoryBankError) as e:
        verify_memory(_cfg(bank.path, cache), ["d"])
    message = str(e.value)
    assert "\n" not in message and f"{bank.path / name}: sha256" in message
    assert "does not match the manifest" in message


def test_an_index_the_manifest_has_no_hash_for_is_refused_until_rebuilt(tmp_path):
    bank = _bank(tmp_path)
    manifest = json.loads((bank.path / "manifest.json").read_text())
    del manifest["index"]  # a bank built before indexes were hashed
    (bank.path / "manifest.json").write_text(json.dumps(manifest))
    cache = _cache(bank, tmp_path / "nb.jsonl")
    with pytest.raises(MemoryBankError, match=r"index.faiss: .*manifest.json records no sha256 for it .*"
                                              r"`maps memory index --bank "):
        verify_memory(_cfg(bank.path, cache), ["d"])
    from maps.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["memory", "info", "--bank", str(bank.path), "--verify"])
    assert out.exit_code != 0 and "maps memory index --bank" in out.output
    out = runner.invoke(main, ["memory", "index", "--bank", str(bank.path)])
    assert out.exit_code == 0, out.output
    assert "flat index over 5 keys" in out.output  # the kind of the index it replaced
    verify_memory(_cfg(bank.path, cache), ["d"])
    out = runner.invoke(main, ["memory", "info", "--bank", str(bank.path), "--verify"])
    assert out.exit_code == 0 and "all array hashes and the index match the manifest" in out.output


def test_online_retrieval_needs_a_recorded_index(tmp_path):
    bank = _bank(tmp_path, index=False)
    verify_memory(_cfg(bank.path, _cache(bank, tmp_path / "nb.jsonl")), ["d"])  # no index needed
    with pytest.raises(MemoryBankError, match="has no index, which online retrieval"):
        verify_memory(_cfg(bank.path, "", online=True), ["d"])


MALFORMED = [
    ("files", lambda m: m.pop("files"), "key 'files' is missing"),
    ("files.scene_keys.npy", lambda m: m["files"].pop("scene_keys.npy"), "key 'files.scene_keys.npy' is missing"),
    ("sha256 type", lambda m: m["files"]["object_tokens.npy"].update(sha256=12),
     "key 'files.object_tokens.npy.sha256' must be a string"),
    ("sha256 value", lambda m: m["files"]["object_tokens.npy"].update(sha256="abc"),
     "key 'files.object_tokens.npy.sha256' must be 64 hex digits"),
    ("shape", lambda m: m["files"]["object_areas.npy"].update(shape="7"),
     "key 'files.object_areas.npy.shape' must be a list"),
    ("image_ids", lambda m: m.update(image_ids={"a": 1}), "key 'image_ids' must be a list"),
    ("image id", lambda m: m["image_ids"].__setitem__(0, [1]), "key 'image_ids' holds [1]"),
    ("key_encoder", lambda m: m.update(key_encoder="clip"), "key 'key_encoder' must be an object"),
    ("num_images", lambda m: m.update(num_images=True), "key 'num_images' must be an integer"),
    ("index.sha256", lambda m: m["index"].pop("sha256"), "key 'index.sha256' is missing"),
    ("index.file", lambda m: m["index"].update(file="../../etc/passwd"), "key 'index.file' must be 'index.faiss'"),
    ("encoder_specs", lambda m: m.update(encoder_specs={"dense": "tiledclip"}),
     "key 'encoder_specs.dense' must be an object"),
]


@pytest.mark.parametrize("what, change, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_manifest_is_one_line_naming_it_and_the_key(tmp_path, what, change, message):
    bank = _bank(tmp_path)
    mpath = bank.path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    change(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(MemoryBankError) as e:
        MemoryBank(bank.path)
    assert str(e.value).startswith(f"{mpath}: {message}") and "\n" not in str(e.value)


def test_a_manifest_that_is_no_object_is_refused(tmp_path):
    bank = _bank(tmp_path)
    (bank.path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(MemoryBankError, match="manifest.json: not a memory bank manifest"):
        MemoryBank(bank.path)


def test_a_neighbour_cache_without_its_header_is_refused(tmp_path):
    bank = _bank(tmp_path)
    cache = _cache(bank, tmp_path / "nb.jsonl")
    lines = cache.read_text().splitlines()
    headless = tmp_path / "headless.jsonl"
    headless.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(MemoryBankError, match=r"headless.jsonl:1: no header line"):
        NeighborCache(headless)
    with pytest.raises(MemoryBankError, match=r"headless.jsonl:1: no header line"):
        verify_memory(_cfg(bank.path, headless), ["d"])
    # a header without the bank's fingerprint ties the cache to nothing either
    header = json.loads(lines[0])
    del header["bank_scene_keys_sha256"]
    loose = tmp_path / "loose.jsonl"
    loose.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(MemoryBankError, match=r"loose.jsonl: header key 'bank_scene_keys_sha256' is missing"):
        verify_memory(_cfg(bank.path, loose), ["d"])
    # a cache of another bank is refused by its fingerprint
    other = _bank(tmp_path, "other", seed=1)
    with pytest.raises(MemoryBankError, match="was computed against another bank"):
        verify_memory(_cfg(other.path, cache), ["d"])


@pytest.fixture
def tampered(tiny_bank, tiny_dataset, tmp_path):
    """A copy of the tiny bank (conftest), its neighbour caches, and one flipped byte."""
    bank = tmp_path / "bank"
    shutil.copytree(tiny_bank.path, bank)
    nb = tmp_path / "nb"
    nb.mkdir()
    ids, nn, scores = compute_neighbors(tiny_bank, load_dataset_dicts(tiny_dataset), 3, progress=False)
    write_neighbor_cache(nb / f"{tiny_dataset}.jsonl", tiny_bank, ids, nn, scores, tiny_dataset)
    _flip_last_byte(bank / "object_tokens.npy")
    return bank, nb


def _tiny_cfg(bank, nb, dataset, out, *extra):
    from maps.modeling.build import load_config

    return load_config(MAPS_TINY, ["OUTPUT_DIR", str(out), "DATASETS.TRAIN", f"('{dataset}',)",
                                   "DATASETS.TEST", f"('{dataset}',)", "SOLVER.MAX_ITER", "2",
                                   "SOLVER.STEPS", "()", "MODEL.MAPS.NUM_RETRIEVED", "2",
                                   "MODEL.MAPS.POOL_SIZE", "2", "MODEL.MAPS.MEMORY.BANK", str(bank),
                                   "MODEL.MAPS.MEMORY.NEIGHBORS", str(nb),
                                   "MODEL.MAPS.MEMORY.SEED", "3", *extra])  # the tiny bank's


def test_training_refuses_a_changed_bank_before_writing_anything(tampered, tiny_dataset, tmp_path):
    from maps.engine.train import train

    bank, nb = tampered
    out = tmp_path / "run"
    with pytest.raises(MemoryBankError, match=r"object_tokens.npy: sha256 .* does not match the manifest"):
        train(_tiny_cfg(bank, nb, tiny_dataset, out))
    assert not out.exists()


def test_evaluation_refuses_a_changed_bank_before_writing_anything(tampered, tiny_dataset, tmp_path):
    from maps.engine.evaluate import evaluate

    bank, nb = tampered
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"not read")
    out = tmp_path / "eval"
    with pytest.raises(MemoryBankError, match=r"object_tokens.npy: sha256 .* does not match the manifest"):
        evaluate(_tiny_cfg(bank, nb, tiny_dataset, out, "MODEL.WEIGHTS", str(weights)))
    assert not out.exists()
