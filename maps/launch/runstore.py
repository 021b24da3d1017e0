"""The run store: one directory per (experiment, seed), holding every record of that run.

Layout of ``<root>/<experiment>/seed<k>/``::

    config.yaml    the resolved detectron2 config the run trained with
    metrics.json   detectron2's JSONWriter output (JSON lines, appended; see read_metrics)
    status.json    state (queued / running / done / failed / cancelled), who ran it and when
    wandb.json     W&B run id, mode, project/entity, URL or offline dir, last logged step
    final.json     final metrics (PQ, PQ_th, PQ_st, AP, mIoU, ...) and the iteration

Every record is written atomically (:mod:`maps.io`), so a reader (``maps status``, the report,
a concurrent launcher) never sees half a file. The store is the source of truth for local
aggregation; Slurm and W&B are reconciled against it, not the other way round.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from filelock import Timeout, UnixFileLock

from maps.io import atomic_write_json, atomic_write_text, make_dir
from maps.engine.run_record import (
    CONFIG_FILE,
    FINAL_FILE,
    STATUS_FILE,
    WANDB_FILE,
    RunRecordError,
    read_json as _read_json,
    read_metrics,
)

#: one error for every record of a run
RunStoreError = RunRecordError

PathLike = Union[str, os.PathLike]

#: Every state a run can be in. ``queued`` covers "submitted, not started yet" and
#: "requeued after preemption"; the attempt counter tells them apart.
STATES = ("queued", "running", "done", "failed", "cancelled")
#: States whose run may still make progress without a new submission.
ACTIVE_STATES = ("queued", "running")
#: States that mean the run ended without a result (relaunched only with retry_failed).
FAILED_STATES = ("failed", "cancelled")

LOCK_FILE = ".launch.lock"
#: the kind of a run directory's maps marker (:mod:`maps.io`)
RUN_KIND = "run"

#: Final metrics every training run reports (paper tables: PQ, PQ^Th, PQ^St, AP, mIoU).
FINAL_METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")

_SEED_DIR = re.compile(r"^seed(\d+)$")
_TRACEBACK_TAIL_LINES = 30


def default_runs_root() -> Path:
    """``$MAPS_RUNS`` if set, else ``./runs``."""
    return Path(os.environ.get("MAPS_RUNS") or "runs")


def now_iso() -> str:
    """UTC timestamp with seconds, the format of every time in the records."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def traceback_tail(text: str, lines: int = _TRACEBACK_TAIL_LINES) -> str:
    """The last ``lines`` lines of a traceback: the part that says what went wrong."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass(frozen=True)
class RunRecord:
    """One run as found in the store."""

    experiment: str
    seed: int
    run_dir: Path
    status: Dict[str, Any]
    #: why the run's status.json could not be read (its state is then ``corrupt``)
    error: Optional[str] = None

    @property
    def state(self) -> str:
        if self.error is not None:
            return "corrupt"
        return str(self.status.get("state", "unknown"))


class RunStore:
    """Where runs live on disk, and the only code that reads or writes their records."""

    def __init__(self, root: Optional[PathLike] = None, made_facts: Optional[Dict[str, Any]] = None) -> None:
        self.root = Path(root) if root is not None else default_runs_root()
        #: facts every run directory this store creates records in its maps marker (the
        #: demo: the fingerprint of the dataset its runs train on, to tell stale runs later)
        self.made_facts = dict(made_facts or {})

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # -- locating runs ------------------------------------------------------------------------
    def make_run_dir(self, experiment: str, seed: int) -> Optional[Path]:
        """Create the run directory, marked as made by maps (kind ``run``, see
        :func:`maps.io.make_dir`). Returns the top-most folder created, or None if the run
        directory already existed; :func:`maps.io.unmake_dir` undoes it."""
        return make_dir(self.run_dir(experiment, seed), RUN_KIND, experiment=experiment, seed=seed,
                        **self.made_facts)

    def run_dir(self, experiment: str, seed: int) -> Path:
        """``<root>/<experiment>/seed<seed>``; the experiment name may have ``/`` levels."""
        _check_experiment_name(experiment)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RunStoreError(f"seed must be a non-negative integer, got {seed!r}")
        return self.root / experiment / f"seed{seed}"

    def identify(self, run_dir: PathLike) -> tuple:
        """(experiment, seed) of a run directory, from its path under the root."""
        run_dir = Path(run_dir)
        m = _SEED_DIR.match(run_dir.name)
        try:
            rel = run_dir.parent.relative_to(self.root)
        except ValueError:
            rel = None
        if m is None or rel is None or str(rel) in ("", "."):
            raise RunStoreError(f"{run_dir}: not a run directory of {self.root} (<experiment>/seed<k>)")
        return rel.as_posix(), int(m.group(1))

    def iter_runs(self, selector: str = "*") -> Iterator[RunRecord]:
        """Runs whose experiment name matches the glob ``selector``, sorted by name and seed.

        A run exists once it has a ``status.json`` (written when it is first submitted). A run
        whose status.json cannot be read is listed too, in state ``corrupt`` with the reason
        in ``error``: one damaged record must not hide every other run.
        """
        if not self.root.is_dir():
            return
        found = []
        for status_path in self.root.rglob(STATUS_FILE):
            run_dir = status_path.parent
            if not _SEED_DIR.match(run_dir.name) or run_dir.parent == self.root:
                continue
            experiment, seed = self.identify(run_dir)
            if fnmatch.fnmatchcase(experiment, selector):
                found.append((experiment, seed, run_dir))
        for experiment, seed, run_dir in sorted(found):
            try:
                status = self.read_status(run_dir) or {}
            except RunStoreError as e:
                yield RunRecord(experiment, seed, run_dir, {}, error=str(e))
                continue
            yield RunRecord(experiment, seed, run_dir, status)

    # -- status -------------------------------------------------------------------------------
    def read_status(self, run_dir: PathLike) -> Optional[Dict[str, Any]]:
        """The status record, or None for a run never submitted; checks it is this run's."""
        run_dir = Path(run_dir)
        status = _read_json(run_dir / STATUS_FILE)
        if status is not None:
            self._check_owner(run_dir, status)
        return status

    def write_status(self, run_dir: PathLike, status: Dict[str, Any]) -> None:
        run_dir = Path(run_dir)
        state = status.get("state")
        if state not in STATES:
            raise RunStoreError(f"{run_dir / STATUS_FILE}: state must be one of {STATES}, got {state!r}")
        self._check_owner(run_dir, status)
        old = _read_json(run_dir / STATUS_FILE)
        if old is not None:
            self._check_owner(run_dir, old)
        atomic_write_json(run_dir / STATUS_FILE, status)

    def transition(self, run_dir: PathLike, state: str, **fields: Any) -> Dict[str, Any]:
        """Move a run to ``state``, stamping the time that state starts, and merge ``fields``.

        The experiment and seed come from the path (and must match an existing record).
        ``queued`` stamps ``submitted_at``, ``running`` stamps ``started_at`` and the host,
        the three final states stamp ``ended_at``. Fields given as None are removed.
        """
        run_dir = Path(run_dir)
        experiment, seed = self.identify(run_dir)
        status = self.read_status(run_dir) or {"experiment": experiment, "seed": seed, "attempt": 0}
        status["state"] = state
        stamp = {"queued": "submitted_at", "running": "started_at"}.get(state, "ended_at")
        status[stamp] = now_iso()
        if state == "running":
            status["hostname"] = socket.gethostname()
            status.pop("ended_at", None)
        if state in ("queued", "running"):
            status.pop("error", None)
            status.pop("traceback", None)
        for key, value in fields.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        self.write_status(run_dir, status)
        return status

    def _check_owner(self, run_dir: Path, status: Dict[str, Any]) -> None:
        """Refuse a record that names another run: two experiments must never share a dir."""
        experiment, seed = self.identify(run_dir)
        if status.get("experiment", experiment) != experiment or status.get("seed", seed) != seed:
            raise RunStoreError(
                f"{run_dir / STATUS_FILE}: belongs to experiment {status.get('experiment')!r} "
                f"seed {status.get('seed')!r}, not {experiment!r} seed {seed}; "
                f"refusing to reuse another run's directory"
            )

    # -- other records ------------------------------------------------------------------------
    @staticmethod
    def read_status_file(run_dir: PathLike) -> Optional[Dict[str, Any]]:
        """status.json as it is, without checking it against a store root (any directory)."""
        return _read_json(Path(run_dir) / STATUS_FILE)

    @staticmethod
    def read_metrics(run_dir: PathLike) -> List[Dict[str, Any]]:
        return read_metrics(run_dir)

    @staticmethod
    def write_config(run_dir: PathLike, config_yaml: str) -> None:
        atomic_write_text(Path(run_dir) / CONFIG_FILE, config_yaml)

    @staticmethod
    def read_config(run_dir: PathLike) -> Optional[str]:
        try:
            return (Path(run_dir) / CONFIG_FILE).read_text()
        except FileNotFoundError:
            return None

    @staticmethod
    def write_final(run_dir: PathLike, metrics: Dict[str, Any]) -> None:
        atomic_write_json(Path(run_dir) / FINAL_FILE, metrics)

    @staticmethod
    def read_final(run_dir: PathLike) -> Optional[Dict[str, Any]]:
        return _read_json(Path(run_dir) / FINAL_FILE)

    @staticmethod
    def read_wandb(run_dir: PathLike) -> Optional[Dict[str, Any]]:
        return _read_json(Path(run_dir) / WANDB_FILE)

    @staticmethod
    def write_wandb(run_dir: PathLike, record: Dict[str, Any]) -> None:
        atomic_write_json(Path(run_dir) / WANDB_FILE, record)

    # -- claiming -----------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def claim(run_dir: PathLike, timeout_s: Optional[float] = None, required: bool = True,
              lock_name: str = LOCK_FILE) -> Iterator[bool]:
        """Hold an exclusive lock on a run for a check-then-write section.

        filelock's ``UnixFileLock`` (``flock``) on a lock file in the run directory: a second
        launcher blocks here until the first has written its ``queued`` record, then sees it and
        submits nothing. The kernel releases the lock if the process dies, so a crashed launcher
        leaves no stale claim; the lock file itself stays. Re-entrant within a thread (a nested
        claim of the same run, e.g. a signal handler's, holds at once); other threads and
        processes wait. With ``timeout_s``, gives up after that long: raises, or
        (``required=False``) goes on unlocked and yields False.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = UnixFileLock(run_dir / lock_name, mode=0o644, is_singleton=True, preserve_lock_file=True)
        try:
            lock.acquire(timeout=-1 if timeout_s is None else timeout_s)
            locked = True
        except Timeout:
            if required:
                raise RunStoreError(f"{run_dir / lock_name}: still locked after {timeout_s:g}s") from None
            locked = False
        try:
            yield locked
        finally:
            if locked:
                lock.release()


def _check_experiment_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/"):
        raise RunStoreError(f"invalid experiment name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") or _SEED_DIR.match(p) for p in parts) or "\\" in name:
        raise RunStoreError(f"invalid experiment name {name!r} (no empty, '.', '..' or seed<k> parts)")
