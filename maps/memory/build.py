"""Building the memory: dataset -> encoders -> scene and object banks -> index.

A build can be split into shards, one submitit job each (Slurm on a cluster, local
processes or in-process ``debug`` elsewhere). Shard ``i`` encodes a contiguous range of the
dataset whose bounds fall on multiples of the batch size, so every shard sees exactly the
batches the unsharded build sees and the merge is the same bank, bit for bit. Each shard is
itself a small bank written atomically to ``DIR/shards/shard-XXXXX-of-YYYYY/``; a rerun skips
the shards that are complete, so a preempted or failed build resumes where it stopped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from maps.errors import ConfigError, MemoryBankError
from maps.io import make_dir
from maps.memory.bank import BANK_KIND, BankArrays, MemoryBank, check_replaceable, concat_arrays, write_bank
from maps.memory.encoders import DENSE_ENCODERS, EncoderSpec, build_from_spec
from maps.memory.index import IndexParams, load_or_build_index

__all__ = ["BuildSpec", "encode_dataset", "build_shard", "build_bank", "shard_ranges"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BuildSpec:
    """What a build (or one shard of it) computes; picklable for submitit."""

    dataset: str
    key: EncoderSpec
    dense: EncoderSpec
    batch_size: int = 8
    dtype: str = "float32"

def encode_dataset(dicts: Sequence[Dict], spec: BuildSpec, progress: bool = True,
                   desc: str = "memory") -> BankArrays:
    """Scene keys and object tokens of ``dicts``, batch by batch (one forward per batch)."""
    from maps.memory.dataset import read_image, read_segment_map
    from maps.memory.pooling import pool_segments

    key_enc = build_from_spec(spec.key, "key")
    dense_enc = build_from_spec(spec.dense, "dense")
    keys, tokens, cats, areas, segids, counts = [], [], [], [], [], []
    it = range(0, len(dicts), spec.batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, unit="batch", total=math.ceil(len(dicts) / spec.batch_size))
    for s in it:
        batch = dicts[s:s + spec.batch_size]
        images = [read_image(d) for d in batch]
        keys.append(key_enc.encode(images).numpy())
        for d, image, fmap in zip(batch, images, dense_enc.encode(images)):
            segs = [si for si in d.get("segments_info", []) if not si.get("iscrowd", 0)]
            seg_map = read_segment_map(d)
            if seg_map.shape != image.shape[:2]:
                raise MemoryBankError(f"panoptic PNG {d['pan_seg_file_name']} is "
                                      f"{seg_map.shape}, its image {d['file_name']} "
                                      f"{image.shape[:2]}")
            tok, area = pool_segments(fmap, seg_map, [si["id"] for si in segs])
            tokens.append(tok.numpy())
            cats.append(np.array([si["category_id"] for si in segs], np.int64))
            areas.append(area)
            segids.append(np.array([si["id"] for si in segs], np.int64))
            counts.append(len(segs))
    odim = dense_enc.dim
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    return BankArrays(
        image_ids=[d["image_id"] for d in dicts], file_names=[d["file_name"] for d in dicts],
        scene_keys=cat(keys, (0, key_enc.dim)).astype(np.float32),
        object_tokens=cat(tokens, (0, odim)).astype(np.float32).reshape(-1, odim),
        object_offsets=offsets,
        object_categories=cat(cats, (0,)).astype(np.int64),
        object_areas=cat(areas, (0,)).astype(np.int64),
        object_segment_ids=cat(segids, (0,)).astype(np.int64))

def _identities(spec: BuildSpec) -> Dict[str, dict]:
    return {"key": build_from_spec(spec.key, "key").identity,
            "dense": build_from_spec(spec.dense, "dense").identity}

def _extra(spec: BuildSpec) -> dict:
    return {"encoder_specs": {"key": asdict(spec.key), "dense": asdict(spec.dense)},
            "batch_size": spec.batch_size}

def shard_ranges(n: int, shards: int, batch_size: int) -> List[range]:
    """Contiguous ranges of ``n`` items, bounds on multiples of ``batch_size``."""
    nb = math.ceil(n / batch_size)
    shards = max(1, min(shards, nb)) if n else 1
    bounds = [min(n, (i * nb // shards) * batch_size) for i in range(shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(shards)]

def _shard_dir(out: Path, i: int, count: int) -> Path:
    return out / "shards" / f"shard-{i:05d}-of-{count:05d}"

def _shard_complete(path: Path, spec: BuildSpec, image_ids: list) -> bool:
    try:
        bank = MemoryBank(path)
    except MemoryBankError:
        return False
    m = bank.manifest
    return (m.get("encoder_specs") == _extra(spec)["encoder_specs"]
            and m.get("batch_size") == spec.batch_size and bank.image_ids == image_ids
            and m.get("dtype") == "float32")

def build_shard(dicts: Sequence[Dict], spec: BuildSpec, shard_dir: str,
                progress: bool = True) -> str:
    """One shard job: encode ``dicts`` and write them as a bank at ``shard_dir``.

    Takes the dataset dicts themselves (not the dataset name), so a job in a fresh process
    needs no dataset registration.
    """
    arrays = encode_dataset(dicts, spec, progress=progress, desc=Path(shard_dir).name)
    ids = _identities(spec)
    write_bank(shard_dir, arrays, dataset=spec.dataset, key_encoder=ids["key"],
               dense_encoder=ids["dense"], dtype="float32", extra=_extra(spec))
    return shard_dir

def _run_shards(jobs: List[tuple], folder: Path, executor: str,
                slurm_params: Optional[dict]) -> None:
    import submitit

    if executor not in ("local", "slurm", "debug"):
        raise ConfigError(f"unknown executor {executor!r} (--executor): local, slurm or debug")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=executor)
    params = dict(slurm_params or {})
    params.setdefault("timeout_min", 24 * 60)
    if executor == "slurm":
        params.setdefault("name", "maps-memory-build")
    try:
        ex.update_parameters(**params)
    except (NameError, ValueError) as e:
        raise ConfigError(f"invalid executor parameters {params}: {e}") from None
    submitted = []
    with ex.batch():
        for dicts, spec, shard_dir in jobs:
            submitted.append(ex.submit(build_shard, dicts, spec, shard_dir, False))
    for job, (_, _, shard_dir) in zip(submitted, jobs):
        try:
            job.result()
        except Exception as e:
            raise MemoryBankError(f"shard job {job.job_id} for {shard_dir} failed: {e}. Rerun "
                                  f"the build: completed shards are kept") from None

def build_bank(dataset: str, out, *, encoder: str = "clip", arch: Optional[str] = None,
               dense: str = "tiledclip", dense_arch: Optional[str] = None,
               weights: Optional[str] = None, dense_weights: Optional[str] = None,
               seed: int = 0, batch_size: int = 8, shards: int = 1,
               executor: str = "local", slurm_params: Optional[dict] = None,
               index: str = "hnsw", index_params: Optional[IndexParams] = None,
               dtype: str = "float32", dataset_dicts: Optional[Sequence[Dict]] = None,
               keep_shards: bool = True, progress: bool = True) -> MemoryBank:
    """Build the scene and object banks of ``dataset`` and their index at ``out``.

    The dense extractor shares the key encoder's architecture and weights when both are the
    same backbone (CLIP keys and TiledCLIP values: one frozen CLIP, as in the paper);
    otherwise ``dense_arch`` / ``dense_weights`` (default: that backbone's default, random).
    ``shards > 1`` runs one submitit job per shard (``executor``: local | slurm | debug;
    ``slurm_params``: submitit parameters such as a cluster profile's partition or gpus).
    """
    if dense not in DENSE_ENCODERS:
        raise ConfigError(f"unknown dense encoder {dense!r} (--dense); choose from "
                          f"{sorted(DENSE_ENCODERS)}")
    if batch_size < 1 or shards < 1:
        raise ConfigError(f"--batch-size and --shards must be >= 1 (got {batch_size}, {shards})")
    same_backbone = DENSE_ENCODERS[dense][0] == encoder
    key_spec = EncoderSpec(encoder, arch, weights or None, seed)
    dense_spec = EncoderSpec(dense, arch if same_backbone else dense_arch,
                             (weights if same_backbone else dense_weights) or None, seed)
    if dense_arch and same_backbone:
        dense_spec = replace(dense_spec, arch=dense_arch)
    spec = BuildSpec(dataset, key_spec, dense_spec, batch_size, dtype)
    if dataset_dicts is None:
        from maps.memory.dataset import load_dataset_dicts
        dataset_dicts = load_dataset_dicts(dataset)
    dicts = list(dataset_dicts)
    out = Path(out)
    keep = ("shards",) if keep_shards else ()
    check_replaceable(out, keep)  # before hours of encoding: never replace a user's folder
    if shards > 1:
        make_dir(out, BANK_KIND)  # the shards go inside: marked, so that the bank may replace it
    if shards == 1:
        arrays = encode_dataset(dicts, spec, progress=progress)
    else:
        ranges = shard_ranges(len(dicts), shards, batch_size)
        dirs = [_shard_dir(out, i, len(ranges)) for i in range(len(ranges))]
        todo = [(dicts[r.start:r.stop], spec, str(d)) for r, d in zip(ranges, dirs)
                if not _shard_complete(d, spec, [x["image_id"] for x in dicts[r.start:r.stop]])]
        logger.info("memory build: %d shards, %d to run", len(ranges), len(todo))
        if todo:
            _run_shards(todo, out / "shards" / "submitit", executor, slurm_params)
        arrays = concat_arrays([MemoryBank(d, mmap=False).arrays for d in dirs])
    ids = _identities(spec)
    write_bank(out, arrays, dataset=dataset, key_encoder=ids["key"], dense_encoder=ids["dense"],
               dtype=dtype, extra=_extra(spec), keep=keep)
    bank = MemoryBank(out)
    params = index_params or IndexParams(kind=index)
    load_or_build_index(out, bank.scene_keys, params)
    return bank
