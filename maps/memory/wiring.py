"""Connects a built memory to training: which bank and which neighbour cache a run reads.

``MODEL.MAPS.MEMORY.NEIGHBORS`` names either one cache file (used for every dataset) or a
directory holding one cache per dataset, ``<dir>/<dataset name>.jsonl`` (what
``maps memory neighbors`` writes for the training and the evaluation set of a run).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Sequence

from detectron2.config import CfgNode

from maps.errors import MemoryBankError


def neighbor_cache_path(neighbors: str, dataset_name: str) -> Path:
    """The neighbour cache of ``dataset_name`` under MODEL.MAPS.MEMORY.NEIGHBORS."""
    p = Path(neighbors)
    if p.is_dir():
        p = p / f"{dataset_name}.jsonl"
    if not p.is_file():
        raise MemoryBankError(
            f"MODEL.MAPS.MEMORY.NEIGHBORS: no neighbour cache for dataset {dataset_name!r} at {p} "
            f"(maps memory neighbors --bank BANK --dataset {dataset_name} --out {p})")
    return p


def build_memory_attacher(cfg: CfgNode, dataset_name: str):
    """The MemoryAttacher of ``cfg`` for images of ``dataset_name``."""
    from maps.memory.retrieval import MemoryAttacher

    if not cfg.MODEL.MAPS.MEMORY.ONLINE:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.MAPS.MEMORY.NEIGHBORS = str(
            neighbor_cache_path(cfg.MODEL.MAPS.MEMORY.NEIGHBORS, dataset_name))
        cfg.freeze()
    return MemoryAttacher(cfg)


def verify_memory(cfg: CfgNode, dataset_names: Sequence[str]) -> Dict[str, Any]:
    """Check the memory a run reads before its step 0; return what the run records of it.

    The bank's manifest is well formed, every array and the FAISS index match the sha256 the
    manifest records (hashed in full once per change of a file, see
    :meth:`MemoryBank.verify`), and the neighbour cache of each of ``dataset_names`` has its
    header and was computed against this bank. Online retrieval needs the index. Raises
    :class:`MemoryBankError`, one line naming the file.
    """
    from maps.memory.bank import MemoryBank
    from maps.memory.retrieval import NeighborCache

    mem = cfg.MODEL.MAPS.MEMORY
    if not mem.BANK:
        raise MemoryBankError("MODEL.MAPS.MEMORY.BANK must name a memory bank directory "
                              "(maps memory build)")
    bank = MemoryBank(mem.BANK)
    bank.verify()
    if mem.ONLINE and "index" not in bank.manifest:
        raise MemoryBankError(f"memory bank {bank.path} has no index, which online retrieval "
                              f"(MODEL.MAPS.MEMORY.ONLINE) searches: build it with "
                              f"`maps memory index --bank {bank.path}`")
    if not mem.ONLINE:
        if not mem.NEIGHBORS:
            raise MemoryBankError("MODEL.MAPS.MEMORY.NEIGHBORS must name a neighbour cache "
                                  "(maps memory neighbors), or set MODEL.MAPS.MEMORY.ONLINE")
        for name in dict.fromkeys(dataset_names):
            NeighborCache(neighbor_cache_path(mem.NEIGHBORS, name)).check_bank(bank)
    return {**bank_record(mem.BANK), "neighbors": os.path.abspath(mem.NEIGHBORS),
            "online": bool(mem.ONLINE)}


def bank_record(bank_dir: str) -> Dict[str, str]:
    """What a run records of the bank it used: its path and its manifest's sha256."""
    manifest = Path(bank_dir) / "manifest.json"
    if not manifest.is_file():
        raise MemoryBankError(f"memory bank {bank_dir}: manifest.json missing")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return {"bank": os.path.abspath(bank_dir), "manifest_sha256": digest}
