"""Bank storage (round trip, truncation, identity refusal) and leak-free retrieval."""

import numpy as np
import pytest
import torch

from maps.errors import MemoryBankError
from maps.memory.bank import BankArrays, MemoryBank, write_bank
from maps.memory.index import IndexParams, blocked_topk, build_index, search_index
from maps.memory.retrieval import Retriever, memory_tokens
from maps.memory.tokens import MemoryTokens

KEY_ID = {"backbone": "clip", "arch": "A", "seed": 0, "weights_sha256": None, "dim": 4}
DENSE_ID = dict(KEY_ID, mode="tiledclip")


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _arrays(keys, counts, ids=None):
    N = len(keys)
    T = int(sum(counts))
    return BankArrays(
        image_ids=list(ids if ids is not None else range(10, 10 + N)),
        file_names=[f"{i}.jpg" for i in range(N)], scene_keys=_unit(keys),
        object_tokens=np.arange(T * 3, dtype=np.float32).reshape(T, 3),
        object_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        object_categories=np.arange(T), object_areas=np.full(T, 5),
        object_segment_ids=np.arange(1, T + 1))


def _bank(tmp_path, keys, counts, ids=None, name="b"):
    write_bank(tmp_path / name, _arrays(keys, counts, ids), dataset="d",
               key_encoder=KEY_ID, dense_encoder=DENSE_ID)
    return MemoryBank(tmp_path / name, verify=True)


def test_round_trip_is_memory_mapped(tmp_path):
    a = _arrays(np.eye(4)[:3] + 0.1, [2, 0, 3])
    bank = _bank(tmp_path, np.eye(4)[:3] + 0.1, [2, 0, 3])
    assert isinstance(bank.scene_keys, np.memmap)
    np.testing.assert_array_equal(bank.scene_keys, a.scene_keys)
    np.testing.assert_array_equal(bank.arrays.object_tokens, a.object_tokens)
    assert bank.image_ids == [10, 11, 12] and bank.num_objects == 5
    assert bank.objects(2) == slice(2, 5)
    assert not list(tmp_path.glob("b.tmp-*"))  # the temporary directory was renamed


def test_missing_truncated_or_inconsistent_bank_is_named(tmp_path):
    bank = _bank(tmp_path, np.eye(4)[:3] + 0.1, [2, 0, 3])
    p = bank.path / "object_tokens.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-8])
    with pytest.raises(MemoryBankError, match="object_tokens.npy"):
        MemoryBank(bank.path)
    p.unlink()
    with pytest.raises(MemoryBankError, match="missing: .*object_tokens.npy"):
        MemoryBank(bank.path)
    p.write_bytes(data)
    # same shape, wrong content: offsets that do not partition the tokens
    np.save(bank.path / "object_offsets.npy", np.array([0, 2, 1, 5], np.int64))
    with pytest.raises(MemoryBankError, match="object_offsets"):
        MemoryBank(bank.path)
    np.save(bank.path / "object_offsets.npy", np.array([0, 2, 2, 5], np.int64))
    MemoryBank(bank.path)
    # a flipped byte is only seen when verifying the hashes
    raw = bytearray((bank.path / "scene_keys.npy").read_bytes())
    raw[-1] ^= 0xFF
    (bank.path / "scene_keys.npy").write_bytes(bytes(raw))
    MemoryBank(bank.path)
    with pytest.raises(MemoryBankError, match="scene_keys.npy: sha256"):
        MemoryBank(bank.path, verify=True)
    (bank.path / "manifest.json").unlink()
    with pytest.raises(MemoryBankError, match="manifest.json is missing"):
        MemoryBank(bank.path)


def test_retriever_refuses_other_encoder(tmp_path):
    bank = _bank(tmp_path, np.eye(4)[:3] + 0.1, [1, 1, 1])
    other = dict(KEY_ID, seed=1)
    with pytest.raises(MemoryBankError) as e:
        Retriever(bank, key_encoder=other)
    assert "random init seed 0" in str(e.value) and "random init seed 1" in str(e.value)
    Retriever(bank, key_encoder=dict(KEY_ID), dense_encoder=DENSE_ID)  # same: accepted


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_self_is_never_retrieved_even_with_duplicates(tmp_path, kind):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(20, 4))
    keys[7] = keys[3]  # image 17 is a duplicate of image 13 under another id
    bank = _bank(tmp_path, keys, [1] * 20)
    r = Retriever(bank, index_params=IndexParams(kind=kind))
    ids, scores = r.search(bank.scene_keys[:], k=4, query_ids=bank.image_ids)
    for q, iid in enumerate(bank.image_ids):
        assert iid not in ids[q] and len(ids[q]) == 4
        assert list(scores[q]) == sorted(scores[q], reverse=True)
    assert ids[3][0] == 17 and ids[7][0] == 13  # the duplicate is found, by id not by score
    assert scores[3][0] == pytest.approx(1.0, abs=1e-5)
    # a query that is not a memory image gets its true nearest neighbour, itself included
    ids, _ = r.search(bank.scene_keys[3:4], k=2, query_ids=["elsewhere"])
    assert set(ids[0]) == {13, 17}


def test_memory_tokens_format(tmp_path):
    bank = _bank(tmp_path, np.eye(4)[:3] + 0.1, [2, 0, 3])
    m = memory_tokens(bank, [2, 0])
    assert m["scene"].shape == (2, 4) and m["object"].shape == (5, 3)
    assert m["object_slot"].tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(m["object"][0], torch.tensor([6.0, 7.0, 8.0]))
    batch = MemoryTokens.collate([m, memory_tokens(bank, [1])])
    assert batch.object.shape == (2, 5, 3) and batch.object_mask[1].all()


def _clustered(n, d, clusters=50, intrinsic=16, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, intrinsic)))[0]
    centers = rng.normal(size=(clusters, intrinsic)) * 3
    z = centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, intrinsic))
    return _unit(z @ basis.T + 0.05 * rng.normal(size=(n, d)))


def test_hnsw_agrees_with_flat_on_clustered_data():
    keys = _clustered(4000, 64)
    q = keys[:300] + 0.01
    _, exact = search_index(build_index(keys, IndexParams("flat")), q, 5)
    _, approx = search_index(build_index(keys, IndexParams("hnsw", M=16, ef_construction=100,
                                                           ef_search=64)), q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, approx)])
    assert recall >= 0.95


@pytest.mark.parametrize("first_pass", ["fp32", "pca", "bf16"])
def test_blocked_topk_agrees_with_faiss_flat(first_pass):
    keys = _clustered(3000, 64, seed=1)
    queries = keys[:500]
    own = np.arange(500)
    s, r = blocked_topk(keys, queries, 5, exclude=own, block=128, first_pass=first_pass,
                        reduce_dim=32, candidates=32)
    fs, fr = search_index(build_index(keys, IndexParams("flat")), queries, 6)
    fr_wo = np.array([[x for x in row if x != i][:5] for i, row in enumerate(fr)])
    assert not (r == own[:, None]).any()
    agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r, fr_wo)])
    assert agree >= (1.0 if first_pass == "fp32" else 0.99)
    np.testing.assert_allclose(s[:, 0], np.sort(fs, 1)[:, ::-1][np.arange(500),
                               (fr[:, 0] == own).astype(int)], atol=1e-5)


def _recall(a, b, k=5):
    return np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b)])


def test_ivf_probing_every_list_is_exact():
    keys = _clustered(3000, 128, seed=2)  # wider than IVF_DIM: the probes use the projection
    own = np.arange(3000)
    es, er = blocked_topk(keys, keys, 5, exclude=own, first_pass="fp32")
    s, r = blocked_topk(keys, keys, 5, exclude=own, first_pass="ivf", nlist=16, nprobe=16)
    np.testing.assert_allclose(s, es, atol=1e-5)
    # rows agree wherever the scores are not tied to within rounding
    tied = np.abs(es[:, :, None] - es[:, None, :]) < 1e-5
    assert ((r == er) | (tied.sum(2) > 1)).all()
    # queries that are not the keys, some without an excluded row
    q = _unit(keys[:400] + 0.01)
    ex = np.where(np.arange(400) % 2 == 0, np.arange(400), -1)
    es, er = blocked_topk(keys, q, 5, exclude=ex, first_pass="fp32")
    s, r = blocked_topk(keys, q, 5, exclude=ex, first_pass="ivf", nlist=16, nprobe=16)
    np.testing.assert_allclose(s, es, atol=1e-5)
    assert _recall(r, er) == 1.0
    assert not (r[::2] == ex[::2, None]).any()


def test_ivf_default_recall_self_exclusion_and_determinism():
    keys = _clustered(4000, 128, seed=3)
    keys[7] = keys[3]  # a duplicate under another row: found, by identity not by score
    own = np.arange(4000)
    _, er = blocked_topk(keys, keys, 5, exclude=own, first_pass="fp32")
    s, r = blocked_topk(keys, keys, 5, exclude=own, first_pass="ivf")
    assert s.dtype == np.float32 and r.dtype == np.int64 and r.shape == (4000, 5)
    assert not (r == own[:, None]).any()
    assert r[3, 0] == 7 and r[7, 0] == 3
    assert (np.diff(s, axis=1) <= 0).all()
    assert _recall(r, er) >= 0.99
    s2, r2 = blocked_topk(keys, keys, 5, exclude=own, first_pass="ivf")
    np.testing.assert_array_equal(r, r2)
    np.testing.assert_array_equal(s, s2)


def test_ivf_tiny_bank():
    keys = _clustered(10, 16, seed=4)
    own = np.arange(10)
    es, er = blocked_topk(keys, keys, 5, exclude=own, first_pass="fp32")
    s, r = blocked_topk(keys, keys, 5, exclude=own, first_pass="ivf")
    np.testing.assert_array_equal(r, er)
    np.testing.assert_allclose(s, es, atol=1e-6)
    assert not (r == own[:, None]).any()
