"""The records of one run directory, as files: names, atomic reads, and metrics.json.

The engine writes these (its W&B writer keeps ``wandb.json``; detectron2's JSONWriter appends
``metrics.json``) and the run store (:mod:`maps.launch.runstore`) reads and writes them for the
launcher, ``maps status`` and the report. Kept here, below both, so that the engine never
imports the launcher.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from maps.errors import MapsError
from maps.io import atomic_write_json

PathLike = Union[str, os.PathLike]

STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
WANDB_FILE = "wandb.json"
FINAL_FILE = "final.json"


class RunRecordError(MapsError):
    """A run directory or one of its records is invalid; the message names the file."""


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise RunRecordError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise RunRecordError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunRecordError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RunRecordError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_metrics(run_dir: PathLike) -> List[Dict[str, Any]]:
    """Read ``metrics.json``: one record per iteration, in iteration order.

    detectron2's JSONWriter appends, so after a resume the iterations between the last
    checkpoint and the crash appear twice; the later lines are the ones of the run that went
    on, so they win. Records of one iteration are merged (later keys override earlier ones)
    because the writer also puts evaluation results on a second line of the same iteration.
    A truncated last line (the job was killed mid-write) is ignored; a bad line anywhere else
    is an error naming the file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise RunRecordError(f"{path}: not valid JSON lines (not UTF-8 text)") from None
    except OSError as e:
        raise RunRecordError(f"{path}: unreadable ({e.strerror or e})") from None
    by_iter: Dict[int, Dict[str, Any]] = {}
    loose: List[Dict[str, Any]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break  # truncated tail of a killed writer
            raise RunRecordError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise RunRecordError(f"{path}: line {i + 1} is not a JSON object")
        if "iteration" not in rec:
            loose.append(rec)
            continue
        it = int(rec["iteration"])
        # pop first so that a re-logged iteration moves to its new position in the file
        merged = by_iter.pop(it, {})
        merged.update(rec)
        by_iter[it] = merged
    return [by_iter[k] for k in sorted(by_iter)] + loose


def trim_metrics(run_dir: PathLike, start_iter: int) -> int:
    """Cut ``metrics.json`` before its first record of an iteration >= ``start_iter``, the
    iteration a resumed training starts from, so the records a killed attempt logged after its
    last checkpoint are not in the file twice (whatever resumed it: ``--resume``, a requeue, a
    retry). In place with one ``ftruncate``: detectron2's JSONWriter keeps the file open in
    append mode and goes on writing at its new end. Returns the records dropped."""
    path = Path(run_dir) / METRICS_FILE
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        offset, cut, dropped = 0, None, 0
        for line in f:
            try:
                it = json.loads(line).get("iteration")
            except (ValueError, AttributeError):
                it = None  # a torn last line of a killed writer: cut with the rest
                cut = offset if cut is None else cut
            if cut is None and isinstance(it, int) and it >= start_iter:
                cut = offset
            if cut is not None:
                dropped += 1
            offset += len(line)
        if cut is not None:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    return dropped


def read_wandb(run_dir: PathLike) -> Optional[Dict[str, Any]]:
    return read_json(Path(run_dir) / WANDB_FILE)


def write_wandb(run_dir: PathLike, record: Dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / WANDB_FILE, record)


def read_status_file(run_dir: PathLike) -> Optional[Dict[str, Any]]:
    """status.json as it is, without checking it against a store root (any directory)."""
    return read_json(Path(run_dir) / STATUS_FILE)


def setup_run_logging(output_dir: str) -> None:
    """detectron2's and maps' loggers to ``<run dir>/log.txt`` (and the console) on rank 0;
    the other ranks of a distributed run to ``log.txt.rank<N>``."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank()
    setup_logger(os.path.join(output_dir, "log.txt"), distributed_rank=rank, name="detectron2")
    setup_logger(os.path.join(output_dir, "log.txt"), distributed_rank=rank, name="maps")
