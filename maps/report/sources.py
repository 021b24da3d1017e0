"""Where the report reads runs from: the run store (default) or the W&B API.

Both sources give the same thing, a :class:`RunIndex`: for every (experiment, seed) the run's
state and its final metrics, plus warnings about records that could not be used. The report
never reads files or calls W&B itself, so the same table comes out of either source for the
same runs, and a source can be swapped for recorded responses in tests.

A bad record (a truncated ``status.json`` or ``final.json``, a run dir that belongs to another
run, a W&B run without the tags that name its experiment) becomes a warning naming the run and
the problem; it is skipped, it never stops the report.
"""
from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from maps.errors import MapsError

__all__ = [
    "RunResult",
    "RunIndex",
    "RunSource",
    "RunStoreSource",
    "WandbSource",
    "WandbApiAdapter",
    "LiveWandbApi",
    "RecordedWandbApi",
    "WANDB_STATES",
    "HISTORY_KEYS",
]

#: W&B run states -> run store states (W&B has no "queued"; "pending" is the closest).
WANDB_STATES = {
    "finished": "done",
    "running": "running",
    "pending": "queued",
    "crashed": "failed",
    "failed": "failed",
    "killed": "cancelled",
    "preempted": "queued",
    "preempting": "running",
}

#: keys of an evaluation metric in metrics.json / W&B history (detectron2's flattened names)
HISTORY_KEYS = {
    "PQ": ("panoptic_seg/PQ", "PQ"),
    "PQ_th": ("panoptic_seg/PQ_th", "PQ_th"),
    "PQ_st": ("panoptic_seg/PQ_st", "PQ_st"),
    "AP": ("segm/AP", "AP"),
    "mIoU": ("sem_seg/mIoU", "mIoU"),
}


@dataclass(frozen=True)
class RunResult:
    """One run as the report sees it: state, final metrics, and where it was read from.

    ``final`` is None unless the run finished and its final record is complete JSON; its values
    are the finite numbers of that record (NaN, a metric that was not evaluated, is dropped, so
    the report treats it as missing).
    """

    experiment: str
    seed: int
    state: str
    final: Optional[Dict[str, float]]
    where: str
    #: why the record could not be used (state ``bad record``), as the warning says it
    problem: Optional[str] = None
    #: config keys whose pretrained file the run replaced by random weights
    random_weights: Tuple[str, ...] = ()


@dataclass
class RunIndex:
    """Every run of a source, by experiment and seed, and the problems met reading them."""

    runs: Dict[str, Dict[int, RunResult]] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def add(self, run: RunResult) -> None:
        seeds = self.runs.setdefault(run.experiment, {})
        old = seeds.get(run.seed)
        if old is not None:
            # two records of one run (W&B: a relaunch under a new id): keep a finished one
            keep, drop = (old, run) if old.final is not None or run.final is None else (run, old)
            self.warnings.append(f"{drop.where}: a second record of {run.experiment} seed "
                                 f"{run.seed} (also {keep.where}); using {keep.where}")
            seeds[run.seed] = keep
            return
        seeds[run.seed] = run

    def of(self, experiment: str) -> Dict[int, RunResult]:
        return self.runs.get(experiment, {})

    def __len__(self) -> int:
        return sum(len(v) for v in self.runs.values())


class RunSource(ABC):
    """Base of the report's sources. ``index()`` reads once and caches."""

    #: how a table names its source (``run store runs/``, ``W&B entity/project``)
    description: str = ""

    def __init__(self) -> None:
        self._index: Optional[RunIndex] = None

    def index(self, known: Optional[Iterable[str]] = None) -> RunIndex:
        """All runs. ``known`` (experiment names) lets a source place runs it cannot name."""
        if self._index is None:
            self._index = self._collect(set(known or ()))
        return self._index

    @abstractmethod
    def _collect(self, known: set) -> RunIndex:
        """Read every run of the source."""

    @abstractmethod
    def history(self, experiment: str, seed: int) -> List[Dict[str, Any]]:
        """Per-iteration records of one run (``iteration`` plus metric keys), in order."""


def _finite_numbers(record: Mapping[str, Any]) -> Dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


# ----------------------------------------------------------------------------------------------
# run store
# ----------------------------------------------------------------------------------------------
class RunStoreSource(RunSource):
    """Runs of a :class:`maps.launch.runstore.RunStore`: ``status.json`` and ``final.json`` per run."""

    def __init__(self, store: Any) -> None:
        super().__init__()
        self.store = store
        self.description = f"run store {store.root}"

    def _collect(self, known: set) -> RunIndex:
        from maps.launch.runstore import FINAL_FILE, STATUS_FILE, RunStoreError

        index = RunIndex()
        root = Path(self.store.root)
        if not root.is_dir():
            index.warnings.append(f"{root}: run store folder not found; no runs read")
            return index
        for run_dir in _run_dirs(root, STATUS_FILE):
            try:
                experiment, seed = self.store.identify(run_dir)
            except RunStoreError as e:
                index.warnings.append(f"{run_dir}: {e}; skipped")
                continue
            try:
                status = self.store.read_status(run_dir) or {}
            except RunStoreError as e:
                problem = f"{run_dir}: {_strip_path(str(e), run_dir)}; run skipped"
                index.warnings.append(problem)
                index.add(RunResult(experiment, seed, "bad record", None, str(run_dir), problem))
                continue
            state = str(status.get("state", "unknown"))
            final, problem = None, None
            if state == "done":
                try:
                    record = self.store.read_final(run_dir)
                except RunStoreError as e:
                    problem = f"{run_dir}: {_strip_path(str(e), run_dir)}; run skipped"
                else:
                    if record is None:
                        problem = f"{run_dir}: state is done but {FINAL_FILE} is missing; run skipped"
                    else:
                        final = _finite_numbers(record)
                if problem is not None:
                    index.warnings.append(problem)
                    state = "bad record"
            index.add(RunResult(experiment, seed, state, final, str(run_dir), problem,
                                tuple(status.get("random_weights") or ())))
        return index

    def history(self, experiment: str, seed: int) -> List[Dict[str, Any]]:
        # a corrupt metrics.json raises RunStoreError (naming the file and line); the caller
        # reports it and skips the curve
        return self.store.read_metrics(self.store.run_dir(experiment, seed))


def _run_dirs(root: Path, status_file: str) -> Iterator[Path]:
    """Directories ``<root>/<experiment...>/seed<k>`` holding a status file (os.walk: faster
    than rglob on big stores, and it does not descend into a run's own subfolders)."""
    for dirpath, dirnames, filenames in os.walk(root):
        name = os.path.basename(dirpath)
        if name.startswith("seed") and name[4:].isdigit() and dirpath != str(root):
            if status_file in filenames:
                yield Path(dirpath)
            dirnames[:] = []  # checkpoints, W&B files, ...: never run dirs
        else:
            dirnames.sort()


def _strip_path(message: str, run_dir: Path) -> str:
    """RunStoreError messages start with the file's path; the warning names the dir already."""
    prefix = f"{run_dir}{os.sep}"
    return message[len(prefix):] if message.startswith(prefix) else message


# ----------------------------------------------------------------------------------------------
# W&B
# ----------------------------------------------------------------------------------------------
class WandbApiAdapter(ABC):
    """The slice of ``wandb.Api`` the report uses: ``runs(path, filters)``.

    Each run has ``name``, ``id``, ``tags``, ``config`` (dict), ``summary`` (mapping),
    ``state``, ``entity``, ``project`` and ``scan_history(keys=None)``, as W&B's public API
    objects do. :class:`LiveWandbApi` calls W&B; :class:`RecordedWandbApi` replays JSON.
    """

    @abstractmethod
    def runs(self, path: str, filters: Optional[Mapping[str, Any]] = None) -> Iterable[Any]:
        """The runs of ``entity/project`` matching ``filters``."""


class LiveWandbApi(WandbApiAdapter):
    """``wandb.Api(timeout=...)``; its failures become one-line :class:`MapsError`\\ s.

    Without an API key W&B raises ``UsageError`` at once; with a key and no network it fails
    after ``timeout`` seconds (CommError / AuthenticationError / a requests timeout).
    """

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout

    def runs(self, path: str, filters: Optional[Mapping[str, Any]] = None) -> Iterable[Any]:
        try:
            import wandb

            api = wandb.Api(timeout=int(self.timeout))
            # materialise here, so paging errors are raised (and translated) here too
            return list(api.runs(path, filters=dict(filters or {})))
        except MapsError:
            raise
        except Exception as e:  # wandb.errors.*, requests.*: their class names vary by version
            raise MapsError(_wandb_error_message(path, e, self.timeout)) from None


def _wandb_error_message(path: str, e: BaseException, timeout: float) -> str:
    kind = type(e).__name__
    text = " ".join(str(e).split())[:200]
    if kind == "UsageError" or "api key" in text.lower():
        hint = "no W&B API key: set WANDB_API_KEY or run `wandb login`, or use --source runs"
    elif "timeout" in kind.lower() or "timed out" in text.lower() or kind in ("CommError", "ConnectionError"):
        hint = f"W&B not reachable within {timeout:g}s (network?); use --source runs"
    elif kind == "AuthenticationError":
        hint = "W&B refused the API key, or was not reachable; use --source runs"
    else:
        hint = "use --source runs to read the local run store instead"
    return f"W&B API for '{path}': {kind}: {text} ({hint})"


class RecordedRun:
    """A W&B run replayed from a recorded JSON object (the fields of ``wandb.apis.public.Run``)."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.id: str = record["id"]
        self.name: str = record.get("name", self.id)
        self.entity: str = record.get("entity", "")
        self.project: str = record.get("project", "")
        self.state: str = record.get("state", "finished")
        self.tags: List[str] = list(record.get("tags", []))
        self.config: Dict[str, Any] = dict(record.get("config", {}))
        self.summary: Dict[str, Any] = dict(record.get("summary", {}))
        self._history: List[Dict[str, Any]] = list(record.get("history", []))

    def scan_history(self, keys: Optional[Sequence[str]] = None, page_size: int = 1000) -> Iterator[Dict[str, Any]]:
        """As W&B's: every logged row; with ``keys``, only rows having all of them (plus _step)."""
        for row in self._history:
            if keys is None:
                yield dict(row)
            elif all(k in row for k in keys):
                yield {k: row[k] for k in ("_step", *keys) if k in row}


class RecordedWandbApi(WandbApiAdapter):
    """Replays runs recorded as JSON (a list of run objects, or ``{"runs": [...]}``).

    ``filters`` supports what the report sends: ``{"tags": {"$in": [...]}}`` and
    ``{"state": S}``; the path selects runs whose entity/project match when they are recorded.
    """

    def __init__(self, records: Any) -> None:
        if isinstance(records, (str, os.PathLike)):
            path = Path(records)
            try:
                records = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise MapsError(f"{path}: cannot read recorded W&B runs ({e})") from None
        if isinstance(records, Mapping):
            records = records.get("runs", [])
        self._runs = [RecordedRun(r) for r in records]
        self.calls: List[Tuple[str, Dict[str, Any]]] = []

    def runs(self, path: str, filters: Optional[Mapping[str, Any]] = None) -> Iterable[Any]:
        filters = dict(filters or {})
        self.calls.append((path, filters))
        entity, _, project = path.rpartition("/")
        out = []
        for run in self._runs:
            if (run.project and run.project != project) or (entity and run.entity and run.entity != entity):
                continue
            wanted_tags = filters.get("tags", {}).get("$in") if isinstance(filters.get("tags"), Mapping) else None
            if wanted_tags is not None and not set(wanted_tags) & set(run.tags):
                continue
            if "state" in filters and run.state != filters["state"]:
                continue
            out.append(run)
        return out


class WandbSource(RunSource):
    """Runs of a W&B project, named by their tags ``exp:<experiment>`` and ``seed:<k>``.

    A run without those tags is placed by its config's ``OUTPUT_DIR`` (``.../<experiment>/
    seed<k>``, matched against the registry's names) and ``SEED``; failing that it is skipped
    with a warning. Final metrics are the run summary's PQ, PQ_th, PQ_st, AP, mIoU (what the
    W&B writer's ``log_final`` puts there) and ``iteration``; history comes from
    ``scan_history``.
    """

    def __init__(self, api: WandbApiAdapter, entity: Optional[str], project: str) -> None:
        super().__init__()
        if not project:
            raise MapsError("--source wandb needs --project (and usually --entity)")
        self.api = api
        self.path = f"{entity}/{project}" if entity else project
        self.description = f"W&B {self.path}"
        self._by_key: Dict[Tuple[str, int], Any] = {}

    def _collect(self, known: set) -> RunIndex:
        index = RunIndex()
        for run in self.api.runs(self.path, filters={}):
            where = f"W&B {self.path}/{run.id} ({run.name})"
            placed = _place_wandb_run(run, known)
            if placed is None:
                index.warnings.append(f"{where}: no exp:/seed: tags and no config OUTPUT_DIR "
                                      "naming a registry experiment; run skipped")
                continue
            experiment, seed = placed
            state = WANDB_STATES.get(str(run.state), str(run.state))
            final = None
            if state == "done":
                summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
                final = _finite_numbers(summary)
                for metric, keys in HISTORY_KEYS.items():  # no log_final: the last eval logged
                    if metric not in final:
                        found = next((final[k] for k in keys if k in final), None)
                        if found is not None:
                            final[metric] = found
                if "iteration" not in final and isinstance(run.summary.get("_step"), (int, float)):
                    final["iteration"] = float(run.summary["_step"])
            self._by_key[(experiment, seed)] = run
            facts = (run.config or {}).get("maps") or {}
            random = tuple(facts.get("random_weights") or ()) if isinstance(facts, dict) else ()
            index.add(RunResult(experiment, seed, state, final, where, random_weights=random))
        return index

    def history(self, experiment: str, seed: int) -> List[Dict[str, Any]]:
        run = self._by_key.get((experiment, seed))
        if run is None:
            return []
        by_step: Dict[int, Dict[str, Any]] = {}
        for row in run.scan_history():
            if "_step" not in row:
                continue
            step = int(row["_step"])
            merged = by_step.setdefault(step, {"iteration": step})
            merged.update({k: v for k, v in row.items() if not k.startswith("_")})
        return [by_step[k] for k in sorted(by_step)]


def _place_wandb_run(run: Any, known: set) -> Optional[Tuple[str, int]]:
    tags = {t.partition(":")[0]: t.partition(":")[2] for t in (run.tags or []) if ":" in t}
    experiment, seed = tags.get("exp"), tags.get("seed")
    if experiment and seed is not None and seed.isdigit():
        return experiment, int(seed)
    out_dir = str((run.config or {}).get("OUTPUT_DIR", ""))
    parts = Path(out_dir).parts
    if len(parts) >= 2 and parts[-1].startswith("seed") and parts[-1][4:].isdigit():
        for i in range(len(parts) - 1):
            name = "/".join(parts[i:-1])
            if name in known:
                return name, int(parts[-1][4:])
    return None
