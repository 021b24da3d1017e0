"""Nearest-neighbour search over the bank's unit-norm keys (inner product = cosine).

Two back-ends:

* FAISS (paper section 4.2): ``IndexHNSWFlat`` with inner product (the paper's choice) or
  exact ``IndexFlatIP``; stored inside the bank directory and rebuilt when absent or stale.
* :func:`blocked_topk`: exact search as blocked matrix products with a top-k per block, for
  the neighbour cache (every image of a dataset against the whole bank). An optional cheap
  first pass (bf16 where the hardware has fast bf16, or the keys projected on their top
  principal directions) picks ``candidates`` per query, re-scored exactly in fp32; or an
  inverted file (``ivf``: k-means lists, each query scored in fp32 against its ``nprobe``
  nearest lists only), approximate but far faster at COCO scale.

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
           "blocked_topk", "fast_bf16_available", "ivf_nlist"]

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
                        save: bool = True, rebuild: bool = False):
    """The bank's index: read from ``bank_dir/index.faiss`` when it matches ``params`` and the
    key count, else built (and saved atomically when ``save``). ``params=None`` takes the
    stored index whatever its kind (HNSW by default when there is none).

    A saved index's sha256 goes into the bank's manifest (training verifies it). A stored
    index the manifest has no record of (a bank built before indexes were hashed) is stale:
    rebuilt, as with ``rebuild``."""
    import faiss

    bank_dir = Path(bank_dir)
    meta_path, path = bank_dir / INDEX_META, bank_dir / INDEX_FILE
    if not rebuild and meta_path.is_file() and path.is_file() and _recorded(bank_dir):
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
        from maps.memory.bank import record_index

        record_index(bank_dir, asdict(params), len(keys))
    return index


def _recorded(bank_dir: Path) -> bool:
    """False for a bank whose manifest has no record of its index (no manifest: no bank, no
    record to keep)."""
    try:
        manifest = json.loads((bank_dir / "manifest.json").read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "index" in manifest


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


# first_pass="ivf" (see blocked_topk); defaults measured on benchmarks/retrieval.py's data
IVF_NPROBE = 16          # inverted lists probed per query
IVF_MIN_KEYS = 1024      # fewer keys: plain exact fp32 search
IVF_DIM = 64             # k-means and probes work on the keys' top principal directions
IVF_TRAIN = 30_000       # k-means sample size
IVF_ITERS = 10           # k-means iterations
IVF_CHUNK = 128          # queries per score block of one inverted list
IVF_ROWS = 32768         # query rows gathered per batch of blocks
IVF_SCORES = 1 << 22     # scores per batch of blocks


@torch.no_grad()
def blocked_topk(keys, queries, k: int, exclude: Optional[np.ndarray] = None,
                 block: int = 1024, first_pass: str = "auto", candidates: int = 32,
                 reduce_dim: int = 128, device: Optional[str] = None,
                 progress: bool = False, nprobe: int = IVF_NPROBE,
                 nlist: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of each query against ``keys``.

    ``exclude`` (Q,) gives, per query, a row of ``keys`` it must never return (its own row
    when the query image is a memory image; -1 for none): exclusion is by identity, never by
    score, so a duplicate image with another id is still found.

    ``first_pass``: ``fp32`` (exact, one pass), ``bf16`` (bf16 scores pick ``candidates``,
    re-scored in fp32), ``pca`` (scores on the top ``reduce_dim`` principal directions pick
    the candidates, re-scored in fp32), ``ivf`` (see below) or ``auto`` (bf16 where fast,
    else fp32). The two-pass modes are exact whenever the true top-k is among the
    candidates; measure their recall on your data (benchmarks/retrieval.py does).

    ``ivf`` is an inverted file: spherical k-means (``IVF_ITERS`` iterations on a seeded
    sample of ``IVF_TRAIN`` keys, in the keys' top ``IVF_DIM`` principal directions) splits
    the keys into ``nlist`` lists (default :func:`ivf_nlist`, about 4 sqrt(N)); each query
    is scored, in fp32 on all dimensions, against the keys of the ``nprobe`` lists whose
    centroids are nearest to it, each list's keys against all the queries probing it as
    batched matrix products. It is approximate: exact (scores and rows) whenever the true
    top-k lies in the probed lists, and a row in no probed list is missed. It is
    deterministic for a given input. On benchmarks/retrieval.py's 118,000 COCO-scale keys
    against themselves the defaults (nlist 1374, nprobe 16) gave recall@5 0.9995 against
    exact fp32 in 9-10 s on 2 AMD EPYC cores (18 s with other jobs loading them; exact fp32:
    377 s). Recall depends on the data: on 20,000 of the same kind of keys (fewer per natural
    cluster) it was 0.977 (nprobe 64: 0.997), so measure it on yours and raise ``nprobe``
    (``nprobe`` = ``nlist`` is exact) where it falls short. Below ``IVF_MIN_KEYS`` keys it is
    plain fp32 search; a query whose probed lists hold fewer than ``k`` rows it may return
    is searched against all keys. ``nprobe`` and ``nlist`` only matter to ``ivf``.

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
    if first_pass not in ("fp32", "bf16", "pca", "ivf"):
        raise ConfigError(f"unknown first pass {first_pass!r}: fp32, bf16, pca, ivf or auto")
    excl = None if exclude is None else torch.as_tensor(np.asarray(exclude, np.int64), device=dev)
    if first_pass == "ivf":
        if N >= IVF_MIN_KEYS:
            return _ivf_topk(K, Qa, k, excl, block, nprobe, nlist, progress)
        first_pass = "fp32"  # a small bank: exact search costs next to nothing
    C = int(min(N, max(candidates, k + 1)))
    if first_pass == "bf16":
        K1, Q1 = K.to(torch.bfloat16), Qa.to(torch.bfloat16)
    elif first_pass == "pca":
        # principal directions of the keys: the first pass works in reduce_dim dimensions
        sample = K[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:20000].to(dev)]
        _, _, v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
        P = v[:reduce_dim].T.contiguous()
        K1, Q1 = K @ P, Qa @ P
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


def ivf_nlist(n: int) -> int:
    """Default number of k-means clusters for ``n`` keys: about 4 sqrt(n), at most n // 8."""
    return int(max(1, min(n // 8, round(4 * np.sqrt(n)))))


def _centroid_scores(X: torch.Tensor, C: torch.Tensor, reduce, block: int = 16384):
    """``reduce`` of each block of ``X @ C.T``, the score buffer reused (fresh large buffers
    cost as much as the product on some machines: page faults)."""
    buf = torch.empty(min(block, X.shape[0]), C.shape[0], device=X.device)
    out = []
    for s in range(0, X.shape[0], block):
        x = X[s:s + block]
        out.append(reduce(torch.matmul(x, C.T, out=buf[:len(x)])))
    return torch.cat(out)


def _argmax_centroid(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return _centroid_scores(X, C, lambda S: S.argmax(1))


def _top_centroids(X: torch.Tensor, C: torch.Tensor, nprobe: int) -> torch.Tensor:
    return _centroid_scores(X, C, lambda S: S.topk(nprobe, dim=1).indices)


def _centroid_sums(X: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) sums of the rows of ``X`` by centroid (index_add_ is slow on CPU threads)."""
    if k <= 256:  # a one-hot product: cheap for few centroids
        onehot = torch.zeros(k, X.shape[0], device=X.device)
        onehot[assign, torch.arange(X.shape[0], device=X.device)] = 1.0
        return onehot @ X
    # differences of a float64 running sum at the ends of each centroid's rows
    order = torch.argsort(assign, stable=True)
    cs = torch.cumsum(X.index_select(0, order).double(), 0)
    cs = torch.cat([cs.new_zeros(1, X.shape[1]), cs])
    ends = torch.cumsum(torch.bincount(assign, minlength=k), 0)
    return (cs[ends] - cs[torch.cat([ends.new_zeros(1), ends[:-1]])]).float()


def _spherical_kmeans(X: torch.Tensor, C: torch.Tensor, iters: int, g: torch.Generator
                      ) -> torch.Tensor:
    """``iters`` Lloyd iterations of inner-product k-means of the unit rows ``X`` from the
    centroids ``C``; an emptied centroid is re-seeded on a random row."""
    n = X.shape[0]
    for _ in range(iters):
        assign = _argmax_centroid(X, C)
        sums = _centroid_sums(X, assign, len(C))
        empty = (torch.bincount(assign, minlength=len(C)) == 0).nonzero().flatten()
        if len(empty):
            sums[empty] = X[torch.randint(0, n, (len(empty),), generator=g).to(X.device)]
        C = torch.nn.functional.normalize(sums, dim=1)
    return C


def _principal_directions(K: torch.Tensor, dim: int, sample: int = 20000) -> torch.Tensor:
    """(D, dim): the top eigenvectors of the keys' (uncentred) second moment, on a seeded
    sample: the subspace that best keeps inner products."""
    g = torch.Generator().manual_seed(0)
    X = K if len(K) <= sample else K[torch.randperm(len(K), generator=g)[:sample].to(K.device)]
    _, v = np.linalg.eigh((X.T @ X).double().cpu().numpy())
    return torch.from_numpy(np.ascontiguousarray(v[:, ::-1][:, :dim])).float().to(K.device)


def _ivf_topk(K: torch.Tensor, Qa: torch.Tensor, k: int, excl: Optional[torch.Tensor],
              block: int, nprobe: int, nlist: Optional[int], progress: bool
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Cluster-pruned search, scored exactly in fp32 (see :func:`blocked_topk`)."""
    dev = K.device
    (N, D), Q = K.shape, Qa.shape[0]
    if Q == 0:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    nlist = int(min(N, max(1, nlist if nlist is not None else ivf_nlist(N))))
    self_join = Qa.shape == K.shape and torch.equal(Qa, K)
    # the clustering and the probes work in the keys' principal subspace; scores do not
    if D > IVF_DIM:
        P = _principal_directions(K, IVF_DIM)
        Kr = torch.nn.functional.normalize(K @ P, dim=1)
        Qr = Kr if self_join else torch.nn.functional.normalize(Qa @ P, dim=1)
    else:
        Kr = torch.nn.functional.normalize(K, dim=1)
        Qr = Kr if self_join else torch.nn.functional.normalize(Qa, dim=1)
    g = torch.Generator().manual_seed(0)
    train = Kr if N <= IVF_TRAIN else Kr[torch.randperm(N, generator=g)[:IVF_TRAIN].to(dev)]
    g = torch.Generator().manual_seed(1)
    init = train[torch.randperm(len(train), generator=g)[:nlist].to(dev)].clone()
    C = _spherical_kmeans(train, init, IVF_ITERS, g)
    nlist = len(C)
    nprobe = int(min(nlist, max(1, nprobe)))
    if self_join:  # the neighbour cache: a key's first probe is its list
        qprobe = _top_centroids(Kr, C, nprobe)
        assign = qprobe[:, 0]
    else:
        assign = _argmax_centroid(Kr, C)
        qprobe = _top_centroids(Qr, C, nprobe)
    del Kr, Qr
    # inverted lists: the keys reordered so that each list's rows are contiguous
    a_np = assign.cpu().numpy()
    sml = np.int16 if nlist < 2 ** 15 else np.int64  # numpy's stable sort is a radix sort
    order = np.argsort(a_np.astype(sml), kind="stable")
    sizes = np.bincount(a_np, minlength=nlist)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    order_t = torch.from_numpy(order).to(dev)
    Kp = K.index_select(0, order_t)
    # the queries likewise, by their first probe (for locality; in the cache, Qs is Kp)
    qp_np = qprobe.cpu().numpy()
    qorder = order if self_join else np.argsort(qp_np[:, 0].astype(sml), kind="stable")
    Qs = Kp if self_join else Qa.index_select(0, torch.from_numpy(qorder).to(dev))
    # (query, probe) pairs, p = sorted query * nprobe + j, grouped by probed list
    flat = qp_np[qorder].reshape(-1)
    porder = np.argsort(flat.astype(sml), kind="stable")
    pc = flat[porder]
    psizes = np.bincount(flat, minlength=nlist)
    poffsets = np.concatenate([[0], np.cumsum(psizes)])
    if excl is not None:  # position of each pair's excluded row in the probed list, or -1
        e = excl.cpu().numpy()[qorder][porder // nprobe]
        ec = np.clip(e, 0, None)
        inv = np.empty(N, np.int64)
        inv[order] = np.arange(N)
        epos = np.where((e >= 0) & (a_np[ec] == pc), inv[ec] - offsets[pc], -1)
    # tasks: up to IVF_CHUNK pairs of one list, sorted by list size and batched
    live = np.nonzero((psizes > 0) & (sizes > 0))[0]
    live = live[np.argsort(sizes[live], kind="stable")]
    nch = -(-psizes[live] // IVF_CHUNK)
    t_c = np.repeat(live, nch)
    t_s = poffsets[t_c] + IVF_CHUNK * (np.arange(len(t_c)) - np.repeat(np.cumsum(nch) - nch, nch))
    t_n = np.minimum(IVF_CHUNK, poffsets[t_c + 1] - t_s)
    batches, i = [], 0
    while i < len(t_c):
        j = i + 1
        while (j < len(t_c) and (j - i + 1) * IVF_CHUNK <= IVF_ROWS
               and (j - i + 1) * IVF_CHUNK * sizes[t_c[j]] <= IVF_SCORES):
            j += 1
        batches.append((i, j))
        i = j
    # per pair (in porder): the top k of its list, as scores and positions in Kp
    rows_max = max((IVF_CHUNK * (j - i) for i, j in batches), default=0)
    best_s = torch.full((Q * nprobe + rows_max, k), float("-inf"), device=dev)
    best_p = torch.full((Q * nprobe + rows_max, k), -1, dtype=torch.int64, device=dev)
    # reused buffers (see _centroid_scores)
    Qbuf = torch.empty(rows_max, D, device=dev)
    Kbuf = torch.empty(max((sizes[t_c[j - 1]] * (j - i) for i, j in batches if j - i > 1),
                           default=0), D, device=dev)
    Sbuf = torch.empty(max((IVF_CHUNK * sizes[t_c[j - 1]] * (j - i) for i, j in batches),
                           default=0), device=dev)
    ar = np.arange(IVF_CHUNK)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="ivf search", unit="batch")
    for i, j in batches:
        c, s, n = t_c[i:j], t_s[i:j], t_n[i:j]
        B, L = j - i, int(sizes[c[-1]])
        pvalid = ar[None, :] < n[:, None]                            # (B, CHUNK)
        pidx = np.where(pvalid, s[:, None] + ar[None, :], s[:, None])
        qrows = torch.from_numpy((porder[pidx] // nprobe).reshape(-1)).to(dev)
        Qg = torch.index_select(Qs, 0, qrows, out=Qbuf[:B * IVF_CHUNK]).view(B, IVF_CHUNK, D)
        S = Sbuf[:B * IVF_CHUNK * L].view(B, IVF_CHUNK, L)
        if B == 1:  # one list: its keys are a slice of Kp
            kpos = torch.arange(offsets[c[0]], offsets[c[0]] + L, device=dev)[None, :]
            torch.bmm(Qg, Kp[offsets[c[0]]:offsets[c[0]] + L].T.unsqueeze(0), out=S)
        else:
            kvalid = np.arange(L)[None, :] < sizes[c][:, None]       # (B, L)
            kpos = torch.from_numpy(np.where(kvalid, offsets[c][:, None] + np.arange(L)[None, :],
                                             offsets[c][:, None])).to(dev)
            Kg = torch.index_select(Kp, 0, kpos.view(-1), out=Kbuf[:B * L]).view(B, L, D)
            torch.bmm(Qg, Kg.transpose(1, 2), out=S)
            S.masked_fill_(torch.from_numpy(~kvalid).to(dev)[:, None, :], float("-inf"))
        if excl is not None:
            ep = epos[pidx]
            bi, pi = np.nonzero((ep >= 0) & pvalid)
            if len(bi):
                S[torch.from_numpy(bi).to(dev), torch.from_numpy(pi).to(dev),
                  torch.from_numpy(ep[bi, pi]).to(dev)] = float("-inf")
        kk = min(k, L)
        ts, ti = S.topk(kk, dim=2)                                   # (B, CHUNK, kk)
        tp = kpos.expand(B, L).gather(1, ti.view(B, -1)).view(B * IVF_CHUNK, kk)
        ts = ts.view(B * IVF_CHUNK, kk)
        if kk < k:  # a list shorter than k
            ts = torch.cat([ts, ts.new_full((len(ts), k - kk), float("-inf"))], 1)
            tp = torch.cat([tp, tp.new_full((len(tp), k - kk), -1)], 1)
        # padding rows go to the scratch rows past Q * nprobe
        dst = torch.from_numpy(np.where(pvalid, pidx, Q * nprobe + ar[None, :]
                                        + IVF_CHUNK * np.arange(B)[:, None]).reshape(-1)).to(dev)
        best_s.index_copy_(0, dst, ts)
        best_p.index_copy_(0, dst, tp)
    # back to pair order p, then to queries: the top k of the query's nprobe lists
    inv_p = np.empty_like(porder)
    inv_p[porder] = np.arange(len(porder))
    inv_p = torch.from_numpy(inv_p).to(dev)
    top_s, idx = best_s.index_select(0, inv_p).view(Q, nprobe * k).topk(k, dim=1)
    top_p = best_p.index_select(0, inv_p).view(Q, nprobe * k).gather(1, idx)
    top_r = torch.where(top_p >= 0, order_t[top_p.clamp(min=0)], -1)
    qorder_t = torch.from_numpy(qorder).to(dev)
    out_s = torch.empty_like(top_s).index_copy_(0, qorder_t, top_s)
    out_r = torch.empty_like(top_r).index_copy_(0, qorder_t, top_r)
    short = torch.isinf(out_s[:, -1]).nonzero().flatten()
    for s in range(0, len(short), block):  # fewer than k rows in the probed lists: all keys
        q = short[s:s + block]
        S = Qa.index_select(0, q) @ K.T
        if excl is not None:
            _mask_excluded(S, torch.arange(len(q), device=dev), excl.index_select(0, q))
        out_s[q], out_r[q] = S.topk(k, dim=1)
    return out_s.cpu().numpy(), out_r.cpu().numpy()
