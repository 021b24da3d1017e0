"""Nearest-neighbour search over the bank's unit-norm keys (inner product = cosine).

Two back-ends:

* FAISS (paper section 4.2): ``IndexHNSWFlat`` with inner product (the paper's choice) or
  exact ``IndexFlatIP``; stored inside the bank directory and rebuilt when absent or stale.
* :func:`blocked_topk`: exact search as blocked matrix products with a top-k per block, for
  the neighbour cache (every image of a dataset against the whole bank). An optional cheap
  first pass (bf16 where the hardware has fast bf16, or the keys projected on their top
  principal directions) picks ``candidates`` per query, re-scored exactly in fp32.

numpy 2 trap: ``x / np.sqrt(k)`` silently becomes float64 and FAISS raises TypeError; every
array given to FAISS goes through :func:`as_f32`.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from maps.errors import ConfigError
from maps.io import atomic_write_json

__all__ = ["IndexParams", "as_f32", "build_index", "load_or_build_index", "search_index",
           "blocked_topk", "fast_bf16_available"]

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"


@dataclass(frozen=True)
class IndexParams:
    """FAISS index settings; the defaults follow faiss's usual HNSW choices (the paper gives
    none beyond 'HNSW')."""

    kind: str = "hnsw"          # hnsw | flat
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 128


def as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def build_index(keys: np.ndarray, params: IndexParams = IndexParams()):
    """A FAISS index over ``keys`` (N, D), unit norm, inner product."""
    import faiss

    keys = as_f32(keys)
    d = keys.shape[1]
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        raise ConfigError(f"unknown index kind {params.kind!r} (--index): hnsw or flat")
    if len(keys):
        index.add(keys)
    return index


def search_index(index, queries: np.ndarray, k: int, ef_search: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (Q, k), most similar first; rows are -1 past the bank's size."""
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(int(ef_search), k)
    elif hasattr(index, "hnsw") and index.hnsw.efSearch < k:
        index.hnsw.efSearch = k
    return index.search(as_f32(queries), int(k))


def load_or_build_index(bank_dir, keys: np.ndarray, params: Optional[IndexParams] = None,
                        save: bool = True):
    """The bank's index: read from ``bank_dir/index.faiss`` when it matches ``params`` and the
    key count, else built (and saved atomically when ``save``). ``params=None`` takes the
    stored index whatever its kind (HNSW by default when there is none)."""
    import faiss

    bank_dir = Path(bank_dir)
    meta_path, path = bank_dir / INDEX_META, bank_dir / INDEX_FILE
    if meta_path.is_file() and path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            stored = IndexParams(**meta["params"])
        except (ValueError, KeyError, TypeError):
            meta, stored = None, None
        if meta and meta.get("ntotal") == len(keys) and (params is None or stored == params):
            index = faiss.read_index(str(path))
            if index.ntotal == len(keys):
                if hasattr(index, "hnsw"):
                    index.hnsw.efSearch = stored.ef_search
                return index
    params = params or IndexParams()
    index = build_index(keys, params)
    if save:
        tmp = bank_dir / f".{INDEX_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        atomic_write_json(meta_path, {"params": asdict(params), "ntotal": int(len(keys))})
    return index


def fast_bf16_available(device: torch.device) -> bool:
    """bf16 matrix products are only worth it on GPUs and on CPUs with AMX / AVX512-BF16
    (elsewhere they are emulated, ~100x slower than fp32)."""
    if device.type == "cuda":
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@torch.no_grad()
def blocked_topk(keys, queries, k: int, exclude: Optional[np.ndarray] = None,
                 block: int = 1024, first_pass: str = "auto", candidates: int = 32,
                 reduce_dim: int = 128, device: Optional[str] = None,
                 progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of each query against ``keys``.

    ``exclude`` (Q,) gives, per query, a row of ``keys`` it must never return (its own row
    when the query image is a memory image; -1 for none): exclusion is by identity, never by
    score, so a duplicate image with another id is still found.

    ``first_pass``: ``fp32`` (exact, one pass), ``bf16`` (bf16 scores pick ``candidates``,
    re-scored in fp32), ``pca`` (scores on the top ``reduce_dim`` principal directions pick
    the candidates, re-scored in fp32) or ``auto`` (bf16 where fast, else fp32). The two-pass
    modes are exact whenever the true top-k is among the candidates; measure their recall on
    your data (benchmarks/retrieval.py does).

    Returns (scores, rows), each (Q, k) numpy, most similar first.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # np.array copies: memory-mapped bank arrays are read-only
    K = torch.from_numpy(np.array(keys, dtype=np.float32)).to(dev)
    Qa = torch.from_numpy(np.array(queries, dtype=np.float32)).to(dev)
    N, Q = K.shape[0], Qa.shape[0]
    k = int(min(k, N))
    if first_pass == "auto":
        first_pass = "bf16" if fast_bf16_available(dev) else "fp32"
    if first_pass not in ("fp32", "bf16", "pca"):
        raise ConfigError(f"unknown first pass {first_pass!r}: fp32, bf16, pca or auto")
    C = int(min(N, max(candidates, k + 1)))
    if first_pass == "bf16":
        K1, Q1 = K.to(torch.bfloat16), Qa.to(torch.bfloat16)
    elif first_pass == "pca":
        # principal directions of the keys: the first pass works in reduce_dim dimensions
        sample = K[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:20000].to(dev)]
        _, _, v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
        P = v[:reduce_dim].T.contiguous()
        K1, Q1 = K @ P, Qa @ P
    excl = None if exclude is None else torch.as_tensor(np.asarray(exclude, np.int64), device=dev)
    out_s = np.empty((Q, k), np.float32)
    out_r = np.empty((Q, k), np.int64)
    starts = range(0, Q, block)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="exact search", unit="block")
    for s in starts:
        e = min(Q, s + block)
        rows = torch.arange(e - s, device=dev)
        if first_pass == "fp32":
            S = Qa[s:e] @ K.T
            if excl is not None:
                _mask_excluded(S, rows, excl[s:e])
            top_s, top_r = S.topk(k, dim=1)
        else:
            S = (Q1[s:e] @ K1.T).float()
            if excl is not None:
                _mask_excluded(S, rows, excl[s:e])
            _, cand = S.topk(C, dim=1)                                  # (b, C)
            exact = torch.einsum("bd,bcd->bc", Qa[s:e], K[cand])       # fp32 re-score
            if excl is not None:
                exact[cand == excl[s:e, None]] = float("-inf")
            top_s, idx = exact.topk(k, dim=1)
            top_r = cand.gather(1, idx)
        out_s[s:e] = top_s.cpu().numpy()
        out_r[s:e] = top_r.cpu().numpy()
    return out_s, out_r


def _mask_excluded(S: torch.Tensor, rows: torch.Tensor, excl: torch.Tensor) -> None:
    ok = excl >= 0
    S[rows[ok], excl[ok]] = float("-inf")

