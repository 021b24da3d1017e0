"""The memory of an experiment as a launch prerequisite: where it lives, how it is built.

A registry experiment names its memory with :meth:`maps.registry.Experiment.memory_spec`
(memory dataset, key encoder and architecture, dense extractor, weights, seed, and the
datasets whose images query it). Every run with the same spec reads the same bank and the
same neighbour caches, so they live at a location computed from the spec alone::

    <runs root>/_memory/<dataset>-<key>-<arch>-<dense>-<hash>/
        bank/                      maps.memory.build.build_bank
        neighbors/<query>.jsonl    one neighbour cache per query dataset
        _COMPLETE                  written by the launcher once prepare_memory returned

``prepare_memory(output_dir, **spec)`` is the prerequisite task (``task(output_dir,
**kwargs)``; :func:`maps.launch.memory_jobs.memory_prereq` makes the job): it builds what is missing and keeps what
is complete, so a preempted or failed build resumes and a second call does nothing. Both the
bank and every cache are written atomically. The neighbour count ``k`` defaults to
:data:`DEFAULT_K` (20): large enough for every run that shares the memory (NUM_RETRIEVED up
to 10, Random-Sampling pools of 10), which then take the first neighbours they need.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from maps.errors import ConfigError, MemoryBankError
from maps.io import make_dir

__all__ = ["DEFAULT_K", "MEMORY_KIND", "memory_dir", "prepare_memory",
           "apply_memory", "normalize_spec", "bank_dir", "neighbors_dir"]

logger = logging.getLogger(__name__)

#: neighbours per query image in a shared cache (>= every NUM_RETRIEVED / POOL_SIZE used)
DEFAULT_K = 20
MEMORY_SUBDIR = "_memory"
#: the kind of a memory folder's maps marker (maps.io): what the demo may remove when stale
MEMORY_KIND = "memory"

_SPEC_DEFAULTS: Dict[str, Any] = {
    "key_encoder": "clip", "key_arch": "", "dense": "tiledclip", "weights": "",
    "dense_arch": "", "dense_weights": "", "seed": 0, "index": "hnsw", "k": DEFAULT_K,
}


def normalize_spec(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """A memory spec with every field present and in a canonical form.

    Missing optional fields take their defaults, ``None`` paths become ``""`` and the query
    datasets are a sorted, duplicate-free list, so equal memories have equal specs (and one
    directory) however the caller spelled them.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"memory spec must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - set(_SPEC_DEFAULTS) - {"dataset", "query_datasets"}
    if unknown:
        raise ConfigError(f"memory spec: unknown keys {sorted(unknown)} (allowed: dataset, "
                          f"query_datasets, {', '.join(sorted(_SPEC_DEFAULTS))})")
    if not spec.get("dataset"):
        raise ConfigError("memory spec: 'dataset' (the memory's dataset, the registry entry's "
                          "memory_dataset) is missing")
    out = {k: (spec.get(k) if spec.get(k) is not None else v) for k, v in _SPEC_DEFAULTS.items()}
    out["dataset"] = str(spec["dataset"])
    for key in ("key_encoder", "key_arch", "dense", "weights", "dense_arch", "dense_weights",
                "index"):
        out[key] = str(out[key])
    out["seed"], out["k"] = int(out["seed"]), int(out["k"])
    if out["k"] < 1:
        raise ConfigError(f"memory spec: k must be >= 1, got {out['k']}")
    queries = spec.get("query_datasets") or ()
    if isinstance(queries, str):
        queries = [queries]
    out["query_datasets"] = sorted({str(q) for q in queries})
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"


def memory_dir(spec: Mapping[str, Any], root, data_root: Optional[str] = None) -> Path:
    """``<root>/_memory/<dataset>-<key>-<arch>-<dense>-<hash>``: the memory of ``spec``.

    The hash covers the whole normalized spec and the absolute dataset root (``data_root``,
    default ``$DETECTRON2_DATASETS``): the same dataset name under another root is another
    dataset, and must not reuse a bank built from the first.
    """
    s = normalize_spec(spec)
    payload = dict(s, data_root=os.path.abspath(data_root or datasets_root()))
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    name = "-".join(_slug(p) for p in (s["dataset"], s["key_encoder"], s["key_arch"] or "default",
                                       s["dense"])) + f"-{digest}"
    return Path(root) / MEMORY_SUBDIR / name


def bank_dir(output_dir) -> Path:
    return Path(output_dir) / "bank"


def neighbors_dir(output_dir) -> Path:
    return Path(output_dir) / "neighbors"


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def apply_memory(cfg, output_dir) -> None:
    """Point ``cfg`` at the memory in ``output_dir``: MODEL.MAPS.MEMORY.BANK / NEIGHBORS.

    NEIGHBORS is the directory of per-dataset caches (see :mod:`maps.memory.wiring`). The
    paths are absolute, so a job reads them from any working directory.
    """
    out = Path(output_dir).resolve()
    frozen = cfg.is_frozen()
    if frozen:
        cfg.defrost()
    cfg.MODEL.MAPS.MEMORY.BANK = str(bank_dir(out))
    cfg.MODEL.MAPS.MEMORY.NEIGHBORS = str(neighbors_dir(out))
    if frozen:
        cfg.freeze()


def _register_datasets(data_root: Optional[str]) -> None:
    """Register the library's datasets in this (worker) process under ``data_root``
    (default ``$DETECTRON2_DATASETS``), replacing earlier registrations of the same names."""
    import maps.data  # noqa: F401  (registers on import, from $DETECTRON2_DATASETS)
    from maps.data import register_all

    if data_root:
        register_all(str(data_root))


def _bank_complete(path: Path, s: Mapping[str, Any], image_ids: Sequence) -> bool:
    """Whether ``path`` holds the bank ``s`` describes (readable, same encoders and images)."""
    from maps.memory.bank import MemoryBank

    if not (path / "manifest.json").is_file():
        return False
    try:
        bank = MemoryBank(path)
    except MemoryBankError as e:
        logger.warning("memory bank %s is unusable (%s): rebuilding it", path, e)
        return False
    key = bank.manifest.get("encoder_specs", {}).get("key", {})
    want = {"name": s["key_encoder"], "arch": s["key_arch"] or None,
            "weights": s["weights"] or None, "seed": s["seed"]}
    if {k: key.get(k) for k in want} != want or bank.dataset != s["dataset"] \
            or list(bank.image_ids) != list(image_ids):
        logger.warning("memory bank %s was built from another spec or dataset: rebuilding it", path)
        return False
    return True


def _cache_complete(path: Path, bank, image_ids: Sequence, k: int) -> bool:
    from maps.memory.retrieval import NeighborCache

    if not path.is_file():
        return False
    try:
        cache = NeighborCache(path)
        cache.check_bank(bank)
    except MemoryBankError as e:
        logger.warning("neighbour cache %s is unusable (%s): recomputing it", path, e)
        return False
    want_k = min(k, len(bank) - 1)
    return (int(cache.header.get("k", -1)) >= want_k and len(cache) == len(image_ids)
            and all(i in cache for i in image_ids))


def prepare_memory(output_dir, *, dataset: str, key_encoder: str = "clip", key_arch: str = "",
                   dense: str = "tiledclip", weights: str = "", seed: int = 0,
                   query_datasets: Sequence[str] = (), k: int = DEFAULT_K,
                   dense_arch: str = "", dense_weights: str = "", index: str = "hnsw",
                   data_root: Optional[str] = None, batch_size: int = 8,
                   progress: bool = True) -> Dict[str, Any]:
    """Build the bank of ``dataset`` and the neighbour cache of every query dataset.

    Idempotent: a complete bank (same encoders, same images) and complete caches (computed
    against this bank, with ``k`` neighbours for every image) are kept. An image of the bank
    never lists itself among its neighbours (``compute_neighbors`` excludes it by id), so
    training on the memory's own dataset cannot copy its labels. Returns what was built::

        {"bank": <dir>, "built_bank": bool, "neighbors": {dataset: <file>}, "computed": [...]}
    """
    from maps.memory.build import build_bank
    from maps.memory.dataset import load_dataset_dicts
    from maps.memory.encoders import EncoderSpec, build_from_spec
    from maps.memory.index import IndexParams
    from maps.memory.bank import MemoryBank
    from maps.memory.retrieval import compute_neighbors, write_neighbor_cache

    s = normalize_spec(dict(dataset=dataset, key_encoder=key_encoder, key_arch=key_arch,
                            dense=dense, weights=weights, seed=seed, query_datasets=query_datasets,
                            k=k, dense_arch=dense_arch, dense_weights=dense_weights, index=index))
    _register_datasets(data_root)
    out = Path(output_dir)
    # marked when made here (a launcher or the demo may have made and marked it already)
    make_dir(out, MEMORY_KIND, memory_dataset=s["dataset"],
             data_root=os.path.abspath(data_root or datasets_root()))
    bdir, ndir = bank_dir(out), neighbors_dir(out)

    dicts = load_dataset_dicts(s["dataset"])
    built = False
    if _bank_complete(bdir, s, [d["image_id"] for d in dicts]):
        logger.info("memory bank %s is complete: kept", bdir)
    else:
        logger.info("building the memory bank of %s (%d images) at %s", s["dataset"], len(dicts), bdir)
        build_bank(s["dataset"], bdir, encoder=s["key_encoder"], arch=s["key_arch"] or None,
                   dense=s["dense"], dense_arch=s["dense_arch"] or None,
                   weights=s["weights"] or None, dense_weights=s["dense_weights"] or None,
                   seed=s["seed"], batch_size=batch_size, index=s["index"],
                   dataset_dicts=dicts, progress=progress)
        built = True
    bank = MemoryBank(bdir)
    # the bank's index must exist in the kind asked for (kept banks included)
    from maps.memory.index import load_or_build_index
    load_or_build_index(bdir, bank.scene_keys, IndexParams(kind=s["index"]))

    caches: Dict[str, str] = {}
    computed = []
    key_enc = None
    for name in s["query_datasets"]:
        path = ndir / f"{name}.jsonl"
        caches[name] = str(path)
        qdicts = dicts if name == s["dataset"] else load_dataset_dicts(name)
        ids = [d["image_id"] for d in qdicts]
        if _cache_complete(path, bank, ids, s["k"]):
            logger.info("neighbour cache %s is complete: kept", path)
            continue
        if key_enc is None and any(bank.row(i) is None for i in ids):
            key_enc = build_from_spec(EncoderSpec(**bank.manifest["encoder_specs"]["key"]), "key")
        logger.info("neighbours of %s (%d images, k=%d) -> %s", name, len(qdicts), s["k"], path)
        qids, nn, scores = compute_neighbors(bank, qdicts, s["k"], key_encoder=key_enc,
                                             progress=progress)
        ndir.mkdir(parents=True, exist_ok=True)
        write_neighbor_cache(path, bank, qids, nn, scores, name)
        computed.append(name)
    return {"bank": str(bdir), "built_bank": built, "neighbors": caches, "computed": computed}
