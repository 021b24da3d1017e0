"""The scene and object memory banks on disk (paper section 3.2).

A bank is a directory::

    manifest.json             format and version, dataset, encoder identities, counts, dtype,
                              image ids and file names, shape / dtype / sha256 of every array
    scene_keys.npy            (N, Ds)  CLS key of each memory image, unit norm; it is also the
                              scene memory's value
    object_tokens.npy         (T, Do)  one token per segment: dense features averaged under
                              the segment's mask, all images concatenated
    object_offsets.npy        (N+1,)   int64: image i owns tokens offsets[i]:offsets[i+1]
    object_categories.npy     (T,)     int64: the segment's category (the dataset dict's id)
    object_areas.npy          (T,)     int64: the segment's area in pixels
    object_segment_ids.npy    (T,)     int64: the segment's id in its panoptic PNG
    index.faiss, index.json   the FAISS index over scene_keys (see :mod:`maps.memory.index`);
                              the manifest's ``index`` entry records its sha256 once built
    .verified.json            cache of :meth:`MemoryBank.verify`: size, mtime, ctime and sha256
                              of each file when it last matched the manifest

Arrays are plain ``.npy`` (no pickle), memory-mapped at load, so a 1.3M-token object bank
costs page cache rather than RAM in every data-loader worker. The directory is written
whole into ``DIR.tmp-*`` and renamed into place: a reader never sees half a bank.

Training and evaluation verify every file against the manifest before step 0
(:meth:`MemoryBank.verify`): a file is hashed in full once, then again only when its size,
mtime or ctime changed, so a 100 GB bank is read once per change, not once per run. A bank
whose manifest records no hash for its ``index.faiss`` (built before indexes were hashed) is
refused until ``maps memory index --bank B`` rebuilds the index from the verified keys;
``maps memory info --bank B --verify`` re-hashes everything, ignoring the cache.

Crowd segments (``iscrowd=1``) are *not* stored: a crowd region pools many instances into one
blurred token that is not "an object" in the paper's sense, and COCO's evaluation ignores
them too.
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from maps.errors import MemoryBankError
from maps.io import MADE_MARKER, atomic_write_json, file_sha256, made_by_maps, mark_made, remove_made
from maps.memory.encoders import describe_identity, same_identity

__all__ = ["BANK_FORMAT", "BANK_VERSION", "BankArrays", "MemoryBank", "write_bank",
           "concat_arrays", "atomic_directory", "check_manifest", "record_index"]

BANK_FORMAT = "maps-memory-bank"
BANK_VERSION = 1
MANIFEST = "manifest.json"
#: the verification cache beside the manifest (see :meth:`MemoryBank.verify`)
VERIFIED = ".verified.json"
INDEX_FILE = "index.faiss"

logger = logging.getLogger(__name__)
_FLOAT_ARRAYS = ("scene_keys", "object_tokens")
_INT_ARRAYS = ("object_offsets", "object_categories", "object_areas", "object_segment_ids")
ARRAY_NAMES = _FLOAT_ARRAYS + _INT_ARRAYS

PathLike = Union[str, os.PathLike]


@dataclass
class BankArrays:
    """The content of a bank (or of one shard of it) in memory."""

    image_ids: List
    file_names: List[str]
    scene_keys: np.ndarray          # (N, Ds)
    object_tokens: np.ndarray       # (T, Do)
    object_offsets: np.ndarray      # (N+1,)
    object_categories: np.ndarray   # (T,)
    object_areas: np.ndarray        # (T,)
    object_segment_ids: np.ndarray  # (T,)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def concat_arrays(parts: Sequence[BankArrays]) -> BankArrays:
    """Concatenate banks in order (the merge of a sharded build)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offsets.append(np.asarray(p.object_offsets[1:], np.int64) + base)
        base += int(p.object_offsets[-1])
    cat = lambda name: np.concatenate([np.asarray(getattr(p, name)) for p in parts])  # noqa: E731
    return BankArrays(
        image_ids=[i for p in parts for i in p.image_ids],
        file_names=[f for p in parts for f in p.file_names],
        scene_keys=cat("scene_keys"), object_tokens=cat("object_tokens"),
        object_offsets=np.concatenate(offsets),
        object_categories=cat("object_categories"), object_areas=cat("object_areas"),
        object_segment_ids=cat("object_segment_ids"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: the kind of a bank folder's maps marker (maps.io): a bank maps may replace
BANK_KIND = "bank"


def check_replaceable(path: PathLike, keep: Sequence[str] = ()) -> None:
    """Refuse, before any work, to replace a folder at ``path`` that maps did not write as a
    bank: only a marked bank, or a folder holding nothing but the ``keep`` entries (which move
    into the new bank), is replaced. Anything else there is never deleted."""
    path = Path(path)
    if path.is_symlink():
        raise MemoryBankError(f"{path} is a symbolic link: not replacing it with a bank")
    if not path.exists():
        return
    if not path.is_dir():
        raise MemoryBankError(f"{path} is a file, not a bank folder: not replacing it")
    if made_by_maps(path, BANK_KIND) is None:
        others = sorted(p.name for p in path.iterdir() if p.name not in keep)
        if others:
            raise MemoryBankError(f"{path} has no maps bank marker ({MADE_MARKER}): not deleting it; "
                                  "remove it yourself if it is stale, or choose another --out")


class atomic_directory:
    """``with atomic_directory(DIR) as tmp:`` fill ``tmp``; on success it replaces DIR.

    ``keep`` names entries of an existing DIR that move into the new one (the shards of a
    sharded build). On an exception the temporary directory is removed and DIR is untouched.
    The new DIR carries maps' bank marker; an existing DIR without it is refused (see
    :func:`check_replaceable`), never deleted.
    """

    def __init__(self, path: PathLike, keep: Sequence[str] = ()):
        self.path = Path(path)
        self.keep = keep

    def __enter__(self) -> Path:
        check_replaceable(self.path, self.keep)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        mark_made(self.tmp, BANK_KIND)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            remove_made(self.tmp, BANK_KIND)
            return
        _fsync_dir(self.tmp)
        old = None
        if self.path.exists():
            for name in self.keep:
                if (self.path / name).exists() and not (self.tmp / name).exists():
                    os.rename(self.path / name, self.tmp / name)
            old = self.path.parent / f"{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        if old is not None:
            if made_by_maps(old, BANK_KIND) is not None:
                remove_made(old, BANK_KIND)
            else:  # held only the kept entries, moved into the new bank: empty now
                try:
                    old.rmdir()
                except OSError:  # something else appeared meanwhile: left for its owner
                    pass


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def write_bank(path: PathLike, arrays: BankArrays, *, dataset: str, key_encoder: dict,
               dense_encoder: dict, dtype: str = "float32", extra: Optional[dict] = None,
               keep: Sequence[str] = ()) -> Path:
    """Write ``arrays`` as a bank directory at ``path``, atomically. Returns the path."""
    if dtype not in ("float32", "float16"):
        raise MemoryBankError(f"bank dtype must be float32 or float16, got {dtype!r}")
    _check_arrays(arrays, where=str(path))
    if len(set(arrays.image_ids)) != len(arrays.image_ids):
        raise MemoryBankError(f"{path}: duplicate image ids in the dataset; retrieval excludes "
                              f"an image by its id, so ids must be unique")
    path = Path(path)
    with atomic_directory(path, keep=keep) as tmp:
        files = {}
        for name in ARRAY_NAMES:
            a = getattr(arrays, name)
            a = a.astype(dtype) if name in _FLOAT_ARRAYS else a.astype(np.int64)
            _save_npy(tmp / f"{name}.npy", a)
            files[f"{name}.npy"] = {"shape": list(a.shape), "dtype": str(a.dtype),
                                    "sha256": file_sha256(tmp / f"{name}.npy")}
        manifest = {
            "format": BANK_FORMAT, "version": BANK_VERSION, "dataset": dataset,
            "key_encoder": key_encoder, "dense_encoder": dense_encoder, "dtype": dtype,
            "num_images": arrays.num_images, "num_objects": int(arrays.object_offsets[-1]),
            "scene_dim": int(arrays.scene_keys.shape[1]),
            "object_dim": int(arrays.object_tokens.shape[1]),
            "crowd_segments": "excluded",
            "image_ids": list(arrays.image_ids), "file_names": list(arrays.file_names),
            "files": files, **(extra or {}),
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
    return path


def _read_verified(path: Path) -> Dict[str, dict]:
    try:
        files = json.loads((path / VERIFIED).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def record_index(path: PathLike, params: dict, ntotal: int) -> None:
    """Record the sha256 of the bank's freshly written ``index.faiss`` in its manifest (a
    directory without a manifest is no bank: nothing to record)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        return
    manifest = json.loads(mpath.read_text())
    manifest["index"] = {"file": INDEX_FILE, "sha256": file_sha256(path / INDEX_FILE),
                         "params": dict(params), "ntotal": int(ntotal)}
    atomic_write_json(mpath, manifest, indent=None)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOP_KEYS = (("format", str), ("version", int), ("dataset", str), ("key_encoder", dict),
             ("dense_encoder", dict), ("dtype", str), ("num_images", int), ("image_ids", list),
             ("file_names", list), ("files", dict))
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def check_manifest(m, mpath: Path) -> None:
    """Refuse a manifest with a missing key or a value of the wrong type, in one line naming
    the manifest and the key (instead of a KeyError or AttributeError somewhere later)."""
    def fail(key: str, why: str) -> None:
        raise MemoryBankError(f"{mpath}: key '{key}' {why}")

    def typed(value, kind, key: str) -> None:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fail(key, f"must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {str(value)[:40]!r}")

    if not isinstance(m, dict):
        raise MemoryBankError(f"{mpath}: not a memory bank manifest (a JSON object is expected)")
    if m.get("format") != BANK_FORMAT:
        raise MemoryBankError(f"{mpath}: not a memory bank manifest (format {m.get('format')!r})")
    if m.get("version") != BANK_VERSION:
        raise MemoryBankError(f"{mpath}: bank format version {m.get('version')} is not supported "
                              f"(this library reads version {BANK_VERSION})")
    for key, kind in _TOP_KEYS:
        if key not in m:
            fail(key, "is missing")
        typed(m[key], kind, key)
    if len(m["image_ids"]) != m["num_images"]:
        fail("image_ids", f"has {len(m['image_ids'])} ids, but num_images is {m['num_images']}")
    bad = next((i for i in m["image_ids"] if not isinstance(i, (int, str)) or isinstance(i, bool)),
               None)
    if bad is not None:
        fail("image_ids", f"holds {bad!r}: an image id is an integer or a string")
    if not all(isinstance(f, str) for f in m["file_names"]):
        fail("file_names", "must be a list of strings")
    for name in ARRAY_NAMES:
        key = f"files.{name}.npy"
        meta = m["files"].get(f"{name}.npy")
        if meta is None:
            fail(key, "is missing")
        typed(meta, dict, key)
        for sub, kind in (("shape", list), ("dtype", str), ("sha256", str)):
            if sub not in meta:
                fail(f"{key}.{sub}", "is missing")
            typed(meta[sub], kind, f"{key}.{sub}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
            fail(f"{key}.shape", f"must be a list of sizes, got {meta['shape']!r}")
        if not _SHA256.match(meta["sha256"]):
            fail(f"{key}.sha256", f"must be 64 hex digits, got {meta['sha256'][:70]!r}")
    if "index" in m:
        typed(m["index"], dict, "index")
        for sub in ("file", "sha256"):
            if sub not in m["index"]:
                fail(f"index.{sub}", "is missing")
            typed(m["index"][sub], str, f"index.{sub}")
        if m["index"]["file"] != INDEX_FILE:
            fail("index.file", f"must be {INDEX_FILE!r}, got {m['index']['file'][:70]!r}")
        if not _SHA256.match(m["index"]["sha256"]):
            fail("index.sha256", f"must be 64 hex digits, got {m['index']['sha256'][:70]!r}")
    if "encoder_specs" in m:
        typed(m["encoder_specs"], dict, "encoder_specs")
        for role, spec in m["encoder_specs"].items():
            typed(spec, dict, f"encoder_specs.{role}")


def _check_arrays(a: BankArrays, where: str) -> None:
    N = a.num_images
    off = np.asarray(a.object_offsets)
    T = a.object_tokens.shape[0]
    problems = []
    if a.scene_keys.ndim != 2 or a.scene_keys.shape[0] != N:
        problems.append(f"scene_keys has shape {a.scene_keys.shape}, expected ({N}, Ds)")
    if off.shape != (N + 1,):
        problems.append(f"object_offsets has shape {off.shape}, expected ({N + 1},)")
    elif off[0] != 0 or off[-1] != T or np.any(np.diff(off) < 0):
        problems.append(f"object_offsets (from {off[0]} to {off[-1]}) do not partition the "
                        f"{T} object tokens over {N} images")
    for name in _INT_ARRAYS[1:]:
        if getattr(a, name).shape != (T,):
            problems.append(f"{name} has shape {getattr(a, name).shape}, expected ({T},)")
    if len(a.file_names) != N:
        problems.append(f"{len(a.file_names)} file names for {N} images")
    if problems:
        raise MemoryBankError(f"inconsistent memory bank {where}: " + "; ".join(problems))


class MemoryBank:
    """A bank directory, loaded memory-mapped and checked for consistency.

    ``verify=True`` also re-hashes every array against the manifest (reads every byte).
    """

    def __init__(self, path: PathLike, verify: bool = False, mmap: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise MemoryBankError(f"memory bank not found: {self.path} (build it with "
                                  f"`maps memory build`)")
        if not mpath.is_file():
            raise MemoryBankError(f"{mpath} is missing: {self.path} is not a complete memory "
                                  f"bank (an interrupted build?)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MemoryBankError(f"{mpath} is not valid JSON: {e}") from None
        check_manifest(self.manifest, mpath)
        arrays = {}
        for name in ARRAY_NAMES:
            fname = f"{name}.npy"
            fpath = self.path / fname
            meta = self.manifest["files"].get(fname)
            if meta is None or not fpath.is_file():
                raise MemoryBankError(f"memory bank file missing: {fpath}")
            try:
                a = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise MemoryBankError(f"memory bank file {fpath} is unreadable or truncated: {e}") \
                    from None
            if list(a.shape) != meta["shape"] or str(a.dtype) != meta["dtype"]:
                raise MemoryBankError(
                    f"memory bank file {fpath} has shape {list(a.shape)} {a.dtype}; the manifest "
                    f"says {meta['shape']} {meta['dtype']} (truncated or replaced?)")
            arrays[name] = a
        self.arrays = BankArrays(image_ids=list(self.manifest["image_ids"]),
                                 file_names=list(self.manifest["file_names"]), **arrays)
        _check_arrays(self.arrays, where=str(self.path))
        self._row: Dict = {iid: i for i, iid in enumerate(self.arrays.image_ids)}
        if verify:
            self.verify(full=True)

    # -- integrity -----------------------------------------------------------------------
    def verify(self, full: bool = False, index: bool = True) -> None:
        """Check every array (and with ``index`` the FAISS index) against the manifest's sha256.

        A file is hashed when ``full`` or when its size, mtime or ctime differ from the
        :data:`VERIFIED` cache's; the cache is then rewritten (atomically; a read-only bank is
        simply hashed every time). Raises :class:`MemoryBankError` naming the first file that
        is missing or does not match, or an ``index.faiss`` the manifest records no hash for.
        """
        want = {f"{n}.npy": self.manifest["files"][f"{n}.npy"]["sha256"] for n in ARRAY_NAMES}
        if index:
            recorded = self.manifest.get("index")
            if recorded is not None:
                want[recorded["file"]] = recorded["sha256"]
            elif (self.path / INDEX_FILE).exists():
                raise MemoryBankError(
                    f"{self.path / INDEX_FILE}: {self.path / MANIFEST} records no sha256 for it (a "
                    f"bank built before indexes were hashed): rebuild the index from the verified "
                    f"keys with `maps memory index --bank {self.path}`")
        cache = {} if full else _read_verified(self.path)
        seen = {}
        for name, sha in want.items():
            fpath = self.path / name
            try:
                st = fpath.stat()
            except FileNotFoundError:
                raise MemoryBankError(f"memory bank file missing: {fpath}") from None
            stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
            known = cache.get(name)
            if isinstance(known, dict) and known.get("sha256") == sha and \
                    all(known.get(k) == v for k, v in stamp.items()):
                seen[name] = known
                continue
            if st.st_size > 1 << 30:
                logger.info("hashing %s (%.1f GB) against the manifest (once per change)", fpath,
                            st.st_size / 1e9)
            digest = file_sha256(fpath)
            if digest != sha:
                raise MemoryBankError(
                    f"memory bank file {fpath}: sha256 {digest[:12]}... does not match the "
                    f"manifest's {sha[:12]}... (changed since the bank was built: rebuild it)")
            seen[name] = {**stamp, "sha256": digest}
        if seen != {k: cache.get(k) for k in seen}:
            try:
                atomic_write_json(self.path / VERIFIED, {"files": {**cache, **seen}})
            except OSError as e:
                logger.info("cannot cache the verification of %s (%s): it is re-hashed next time",
                            self.path, e)

    # -- identity ------------------------------------------------------------------------
    @property
    def key_encoder(self) -> dict:
        return self.manifest["key_encoder"]

    @property
    def dense_encoder(self) -> dict:
        return self.manifest["dense_encoder"]

    def check_encoders(self, key: Optional[dict] = None, dense: Optional[dict] = None) -> None:
        """Refuse a bank built with other encoders than the ones configured."""
        for role, want, have in (("key", key, self.key_encoder),
                                 ("dense", dense, self.dense_encoder)):
            if want is not None and not same_identity(want, have):
                raise MemoryBankError(
                    f"memory bank {self.path} was built with {role} encoder "
                    f"{describe_identity(have)}, but {describe_identity(want)} is configured "
                    f"(rebuild the bank or change MODEL.MAPS.MEMORY)")

    # -- content -------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def num_images(self) -> int:
        return self.arrays.num_images

    @property
    def num_objects(self) -> int:
        return int(self.arrays.object_offsets[-1])

    @property
    def image_ids(self) -> List:
        return self.arrays.image_ids

    @property
    def scene_keys(self) -> np.ndarray:
        return self.arrays.scene_keys

    def row(self, image_id) -> Optional[int]:
        """Row of an image id in the bank, or None if it is not a memory image."""
        return self._row.get(image_id)

    def objects(self, row: int) -> slice:
        off = self.arrays.object_offsets
        return slice(int(off[row]), int(off[row + 1]))

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"MemoryBank({str(self.path)!r}, dataset={self.dataset!r}, "
                f"images={self.num_images}, objects={self.num_objects})")
