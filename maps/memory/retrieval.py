"""Leak-free retrieval from the memory (paper sections 3.2-3.3, 4.2).

An image of the set the memory was built from must never retrieve itself: its object tokens
were pooled under its own ground-truth masks, so retrieving them would hand the model its
labels. Exclusion is by image id (search one more, drop the query's own row), never by
score, so a duplicate image stored under another id is still a legitimate neighbour.

The neighbour cache (``maps memory neighbors``) is JSON lines::

    {"format": "maps-neighbors", "version": 1, "bank": ..., "key_encoder": {...}, "k": K, ...}
    {"image_id": 139, "neighbors": [ids, most similar first], "scores": [similarities]}
    ...

(the first line is a header tying the cache to its bank; then one line per image). A cache
without its header is refused: nothing would tie it to a bank.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import configurable

from maps.errors import MemoryBankError
from maps.io import atomic_write_text
from maps.memory.bank import MemoryBank
from maps.memory.index import IndexParams, blocked_topk, load_or_build_index, search_index

__all__ = ["Retriever", "NeighborCache", "MemoryAttacher", "memory_tokens",
           "write_neighbor_cache", "compute_neighbors", "NEIGHBORS_FORMAT"]

NEIGHBORS_FORMAT = "maps-neighbors"
NEIGHBORS_VERSION = 1

def memory_tokens(bank: MemoryBank, rows: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The tokens of retrieved memory images ``rows`` in :mod:`maps.memory.tokens`'s format
    (slot = rank among the retrieved)."""
    a = bank.arrays
    rows = [int(r) for r in rows]
    scene = torch.from_numpy(np.array(a.scene_keys[rows], dtype=np.float32))
    parts, slots = [], []
    for slot, r in enumerate(rows):
        sl = bank.objects(r)
        parts.append(np.array(a.object_tokens[sl], dtype=np.float32))
        slots.append(np.full(sl.stop - sl.start, slot, np.int64))
    dim = a.object_tokens.shape[1]
    obj = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    slot = np.concatenate(slots) if slots else np.zeros(0, np.int64)
    return {"scene": scene, "object": torch.from_numpy(obj),
            "object_slot": torch.from_numpy(slot)}

def _drop_self(rows: np.ndarray, scores: np.ndarray, own: int, k: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    keep = (rows != own) & (rows >= 0)
    return rows[keep][:k], scores[keep][:k]

class Retriever:
    """k nearest memory images of query keys, with their scene and object tokens.

    ``key_encoder`` / ``dense_encoder``: identities of the encoders the caller is configured
    with; a bank built with others is refused (:class:`MemoryBankError` naming both).
    """

    def __init__(self, bank: MemoryBank, index=None, index_params: Optional[IndexParams] = None,
                 key_encoder: Optional[dict] = None, dense_encoder: Optional[dict] = None):
        bank.check_encoders(key_encoder, dense_encoder)
        self.bank = bank
        self.index = index if index is not None else load_or_build_index(
            bank.path, bank.scene_keys, index_params)

    def search(self, queries: np.ndarray, k: int, query_ids: Optional[Sequence] = None
               ) -> Tuple[List[list], List[np.ndarray]]:
        """Per query: the ids of its k nearest memory images and their similarities, most
        similar first, the query's own image (same id) excluded."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if query_ids is not None and len(query_ids) != len(queries):
            raise ValueError(f"{len(query_ids)} query ids for {len(queries)} queries")
        own = [self._own_row(i) for i in query_ids] if query_ids is not None \
            else [-1] * len(queries)
        scores, rows = search_index(self.index, queries, min(k + 1, len(self.bank)))
        ids, sims = [], []
        for q in range(len(queries)):
            r, s = _drop_self(rows[q], scores[q], own[q], k)
            ids.append([self.bank.image_ids[i] for i in r])
            sims.append(s)
        return ids, sims

    def _own_row(self, image_id) -> int:
        r = self.bank.row(image_id)
        return -1 if r is None else r

    def rows(self, image_ids: Sequence) -> List[int]:
        out = []
        for i in image_ids:
            r = self.bank.row(i)
            if r is None:
                raise MemoryBankError(f"image id {i!r} is not in memory bank {self.bank.path}")
            out.append(r)
        return out

    def retrieve(self, queries: np.ndarray, k: int, query_ids: Optional[Sequence] = None
                 ) -> List[Dict[str, torch.Tensor]]:
        """Per query image, its memory in the per-image dict format of maps.memory.tokens."""
        ids, _ = self.search(queries, k, query_ids)
        return [memory_tokens(self.bank, self.rows(i)) for i in ids]

# --------------------------------------------------------------------------------------
# Neighbour cache
# --------------------------------------------------------------------------------------

def _bank_fingerprint(bank: MemoryBank) -> str:
    return bank.manifest["files"]["scene_keys.npy"]["sha256"]

def write_neighbor_cache(path, bank: MemoryBank, image_ids: Sequence, neighbors: Sequence[list],
                         scores: Sequence[Sequence[float]], dataset: str) -> Path:
    """Write the cache atomically (header line, then one line per image)."""
    header = {"format": NEIGHBORS_FORMAT, "version": NEIGHBORS_VERSION,
              "bank": str(bank.path), "bank_scene_keys_sha256": _bank_fingerprint(bank),
              "key_encoder": bank.key_encoder, "dataset": dataset,
              "k": min((len(n) for n in neighbors), default=0)}
    lines = [json.dumps(header)]
    for iid, n, s in zip(image_ids, neighbors, scores):
        lines.append(json.dumps({"image_id": iid, "neighbors": list(n),
                                 "scores": [round(float(x), 6) for x in s]}))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)

class NeighborCache:
    """A neighbour cache file: ``cache[image_id] -> (neighbour ids, scores)``."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MemoryBankError(f"neighbour cache not found: {self.path} (write it with "
                                  f"`maps memory neighbors`)")
        self.header: Dict = {}
        self._map: Dict = {}
        with open(self.path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MemoryBankError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
                if not self.header:
                    self.header = self._check_header(rec, n)
                    continue
                self._add(rec, n)
        if not self.header:
            raise MemoryBankError(f"{self.path}: empty neighbour cache (no header line); "
                                  f"recompute it with `maps memory neighbors`")

    def _check_header(self, rec, n: int) -> Dict:
        if not isinstance(rec, dict) or rec.get("format") != NEIGHBORS_FORMAT:
            raise MemoryBankError(
                f"{self.path}:{n}: no header line (format {NEIGHBORS_FORMAT!r}), so nothing ties "
                f"this neighbour cache to a bank: recompute it with `maps memory neighbors`")
        if rec.get("version") != NEIGHBORS_VERSION:
            raise MemoryBankError(f"{self.path}:{n}: neighbour cache version {rec.get('version')!r} "
                                  f"is not supported (this library reads {NEIGHBORS_VERSION})")
        return rec

    def _add(self, rec, n: int) -> None:
        where = f"{self.path}:{n}"
        if not isinstance(rec, dict) or not {"image_id", "neighbors", "scores"} <= set(rec):
            raise MemoryBankError(f"{where}: expected an object with image_id, neighbors, scores")
        ids, scores = rec["neighbors"], rec["scores"]
        if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != len(scores):
            raise MemoryBankError(f"{where}: neighbors and scores must be lists of equal length")
        if not all(isinstance(i, (int, str)) and not isinstance(i, bool)
                   for i in (rec["image_id"], *ids)):
            raise MemoryBankError(f"{where}: image ids must be integers or strings")
        if not all(isinstance(s, (int, float)) for s in scores):
            raise MemoryBankError(f"{where}: scores must be numbers")
        if any(b > a + 1e-5 for a, b in zip(scores, scores[1:])):
            raise MemoryBankError(f"{where}: neighbours are not sorted most similar first")
        if rec["image_id"] in ids:
            raise MemoryBankError(f"{where}: image {rec['image_id']!r} lists itself as a "
                                  f"neighbour (label leak)")
        if rec["image_id"] in self._map:
            raise MemoryBankError(f"{where}: image {rec['image_id']!r} appears twice")
        self._map[rec["image_id"]] = (ids, np.asarray(scores, np.float32))

    def __getitem__(self, image_id) -> Tuple[list, np.ndarray]:
        try:
            return self._map[image_id]
        except KeyError:
            raise MemoryBankError(f"image {image_id!r} has no entry in the neighbour cache "
                                  f"{self.path}") from None

    def __contains__(self, image_id) -> bool:
        return image_id in self._map

    def __len__(self) -> int:
        return len(self._map)

    def items(self):
        return self._map.items()

    def check_bank(self, bank: MemoryBank) -> None:
        """Refuse a cache computed against another bank (its header's fingerprint is not the
        bank's scene keys' sha256), or naming an image the bank does not hold."""
        want = self.header.get("bank_scene_keys_sha256")
        if not isinstance(want, str):
            raise MemoryBankError(f"{self.path}: header key 'bank_scene_keys_sha256' is missing, "
                                  f"so nothing ties this neighbour cache to bank {bank.path}: "
                                  f"recompute it with `maps memory neighbors`")
        if want != _bank_fingerprint(bank):
            raise MemoryBankError(f"neighbour cache {self.path} was computed against another "
                                  f"bank ({self.header.get('bank')}), not {bank.path}")
        for iid, (ids, _) in self._map.items():
            missing = next((i for i in ids if bank.row(i) is None), None)
            if missing is not None:
                raise MemoryBankError(f"neighbour cache {self.path}: neighbour {missing!r} of image "
                                      f"{iid!r} is not in bank {bank.path}")

def compute_neighbors(bank: MemoryBank, dataset_dicts: Sequence[Dict], k: int, *,
                      key_encoder=None, search: str = "exact", batch_size: int = 32,
                      reuse_bank_keys: bool = True, first_pass: str = "auto",
                      progress: bool = True) -> Tuple[list, List[list], List[np.ndarray]]:
    """Nearest memory images of every image of a dataset, its own image excluded.

    Images that are in the bank (same id) reuse the bank's own key: the bank's key encoder
    on the same file gives the same key, and encoding 118k COCO images again takes hours.
    Others are encoded with ``key_encoder`` (which must be the bank's: checked).
    """
    from maps.memory.dataset import read_image

    ids = [d["image_id"] for d in dataset_dicts]
    rows = [bank.row(i) if reuse_bank_keys else None for i in ids]
    dim = bank.scene_keys.shape[1]
    queries = np.zeros((len(ids), dim), np.float32)
    todo = [n for n, r in enumerate(rows) if r is None]
    have = [n for n, r in enumerate(rows) if r is not None]
    if have:
        queries[have] = np.asarray(bank.scene_keys[[rows[n] for n in have]], np.float32)
    if todo:
        if key_encoder is None:
            raise MemoryBankError(f"{len(todo)} images are not in bank {bank.path}: a key "
                                  f"encoder is needed to encode them")
        bank.check_encoders(key=key_encoder.identity)
        it = range(0, len(todo), batch_size)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="encoding queries", unit="batch")
        for s in it:
            chunk = todo[s:s + batch_size]
            keys = key_encoder.encode([read_image(dataset_dicts[n]) for n in chunk])
            queries[chunk] = keys.numpy()
    own = np.array([r if r is not None else (bank.row(i) if bank.row(i) is not None else -1)
                    for r, i in zip(rows, ids)], np.int64)
    k_eff = min(k, len(bank) - 1) if (own >= 0).any() else min(k, len(bank))
    if search == "exact":
        scores, nn = blocked_topk(bank.scene_keys, queries, k_eff, exclude=own,
                                  first_pass=first_pass, progress=progress)
    elif search == "hnsw":
        index = load_or_build_index(bank.path, bank.scene_keys, None)
        s_all, r_all = search_index(index, queries, k_eff + 1)
        nn_l, sc_l = zip(*[_drop_self(r_all[q], s_all[q], own[q], k_eff)
                           for q in range(len(ids))]) if len(ids) else ((), ())
        nn, scores = list(nn_l), list(sc_l)
    else:
        raise MemoryBankError(f"unknown search {search!r}: exact or hnsw")
    neighbors = [[bank.image_ids[int(r)] for r in row if r >= 0] for row in nn]
    return ids, neighbors, [np.asarray(s) for s in scores]

class MemoryAttacher:
    """Attaches retrieved memory to a training / evaluation dataset dict.

    ``attacher(dataset_dict)`` returns the per-image dict of :mod:`maps.memory.tokens` for the
    ``num_retrieved`` nearest memory images (the Random-Sampling pool when that is on): read
    from the neighbour cache, or, with ``neighbors=None`` (MODEL.MAPS.MEMORY.ONLINE), searched
    in the bank's index for the image's key, encoded online unless the image is a memory
    image (then the bank's stored key is its key). The image's own id is excluded either way.
    With ``query_cls`` it adds the image's own CLS key (MAPS-Aug-CLS).
    """

    @configurable
    def __init__(self, bank: MemoryBank, neighbors: Optional[NeighborCache], num_retrieved: int,
                 query_cls: bool = False, key_encoder=None):
        if neighbors is not None:
            neighbors.check_bank(bank)
        elif key_encoder is not None:
            bank.check_encoders(key=key_encoder.identity)
        self.bank, self.neighbors = bank, neighbors
        self.num_retrieved = int(num_retrieved)
        self.query_cls = query_cls
        self.key_encoder = key_encoder
        self._retriever: Optional[Retriever] = None  # built on first use (FAISS does not pickle)

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.MAPS
        mem = m.MEMORY
        if not mem.BANK:
            raise MemoryBankError("MODEL.MAPS.MEMORY.BANK must name a memory bank directory "
                                  "(maps memory build)")
        if not mem.ONLINE and not mem.NEIGHBORS:
            raise MemoryBankError("MODEL.MAPS.MEMORY.NEIGHBORS must name a neighbour cache "
                                  "(maps memory neighbors), or set MODEL.MAPS.MEMORY.ONLINE")
        from maps.memory.encoders import build_key_encoder

        bank = MemoryBank(mem.BANK)
        # on the CPU: the attacher runs in data-loader workers, where CUDA cannot be used
        key = build_key_encoder(mem.KEY_ENCODER, mem.KEY_ARCH, mem.WEIGHTS or None, mem.SEED,
                                device="cpu")
        bank.check_encoders(key=key.identity)
        dense_spec = bank.manifest.get("encoder_specs", {}).get("dense", {})
        if dense_spec.get("name") and dense_spec["name"] != mem.DENSE:
            raise MemoryBankError(
                f"memory bank {mem.BANK} holds {dense_spec['name']!r} object tokens but "
                f"MODEL.MAPS.MEMORY.DENSE is {mem.DENSE!r}")
        return {"bank": bank,
                "neighbors": None if mem.ONLINE else NeighborCache(mem.NEIGHBORS),
                "num_retrieved": m.POOL_SIZE if m.RANDOM_SAMPLING else m.NUM_RETRIEVED,
                "query_cls": bool(m.APPEND_QUERY_CLS), "key_encoder": key}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_retriever"] = None
        return state

    def neighbor_ids(self, dataset_dict: Dict) -> list:
        iid = dataset_dict["image_id"]
        if self.neighbors is not None:
            ids, _ = self.neighbors[iid]
            where = f"neighbour cache {self.neighbors.path}"
        else:
            if self._retriever is None:
                self._retriever = Retriever(self.bank)
            key = self._own_cls(dataset_dict).numpy()[None]
            ids = self._retriever.search(key, self.num_retrieved, query_ids=[iid])[0][0]
            where = f"bank {self.bank.path}"
        if len(ids) < self.num_retrieved:
            raise MemoryBankError(f"{where} has {len(ids)} neighbours for image {iid!r}; "
                                  f"{self.num_retrieved} needed (recompute it with a larger --k)")
        return list(ids[:self.num_retrieved])

    def __call__(self, dataset_dict: Dict) -> Dict[str, torch.Tensor]:
        iid = dataset_dict["image_id"]
        rows = []
        for n in self.neighbor_ids(dataset_dict):
            r = self.bank.row(n)
            if r is None:
                raise MemoryBankError(f"neighbour {n!r} of image {iid!r} is not in bank "
                                      f"{self.bank.path}")
            rows.append(r)
        out = memory_tokens(self.bank, rows)
        if self.query_cls:
            out["query_cls"] = self._own_cls(dataset_dict)
        return out

    def _own_cls(self, d: Dict) -> torch.Tensor:
        r = self.bank.row(d["image_id"])
        if r is not None:
            return torch.from_numpy(np.array(self.bank.scene_keys[r], np.float32))
        if self.key_encoder is None:
            raise MemoryBankError(f"image {d['image_id']!r} is not in bank {self.bank.path}: "
                                  f"its CLS key needs a key encoder (online encoding)")
        from maps.memory.dataset import read_image

        return self.key_encoder.encode([read_image(d)])[0]
