"""The shared Optuna study: its storage (journal file or RDB), sampler, pruner, and the
liveness of its trials (heartbeats, dead workers' trials marked failed)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional



if TYPE_CHECKING:  # optuna and detectron2 are heavy: keep them out of `maps --help`
    import optuna

logger = logging.getLogger(__name__)

from maps.sweep.spec import SweepError, SweepSpec


# ---------------------------------------------------------------------------------------------
# storage and study
# ---------------------------------------------------------------------------------------------
def study_dir(runs_root: os.PathLike, name: str) -> Path:
    """``<runs root>/sweep/<study>``: the journal, the heartbeats and the worker logs, beside
    the study's trial runs ``trial<N>/seed<s>``."""
    return Path(runs_root) / "sweep" / name


def trial_experiment(study: str, number: int) -> str:
    """The run-store experiment of a trial: ``sweep/<study>/trial<N>``."""
    return f"sweep/{study}/trial{number}"


def default_storage_url(runs_root: os.PathLike, name: str) -> str:
    return f"journal:{(study_dir(runs_root, name) / 'journal.log').absolute()}"


#: where a worker finds a storage URL that carries a password (never in its pickled job)
STORAGE_ENV = "MAPS_OPTUNA_STORAGE"

# scheme://user:PASSWORD@host...: up to the last "@" (an unencoded "@" in a password is
# common), so an odd URL is masked too much rather than too little
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/?#]*:)(?P<pw>.*)@(?P<tail>[^@]*)$")
_QUERY_SECRET = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd)=)(?P<pw>[^&#]*)")


def mask_url(url: str) -> str:
    """``url`` as it may be shown or stored: ``postgresql://user:***@host/db`` (a password in a
    ``password=`` query parameter is masked too). A journal path comes back unchanged.

    Not sqlalchemy's ``render_as_string(hide_password=True)``: its parser ends the password
    at the first "@", so ``user:p@ss@host`` would be shown as ``user:***@ss@host``.
    """
    m = _URL_PASSWORD.match(url)
    if m:
        url = f"{m['head']}***@{m['tail']}"
    return _QUERY_SECRET.sub(lambda q: q["key"] + "***", url)


def url_secrets(url: str) -> List[str]:
    """The passwords ``url`` carries (as written and percent-decoded), longest first."""
    from urllib.parse import unquote

    found = []
    m = _URL_PASSWORD.match(url)
    if m:
        found.append(m["pw"])
    found += [q["pw"] for q in _QUERY_SECRET.finditer(url)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with ``url`` masked and its passwords replaced by
    ``***``. Passwords shorter than 4 characters are left in free text: replacing every "a"
    of a message would make it unreadable, and such a password protects nothing."""
    text = text.replace(url, mask_url(url))
    for secret in url_secrets(url):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def worker_storage_url(shown: str) -> str:
    """The real storage URL of a worker given the masked one: unchanged when it carries no
    password, else ``$MAPS_OPTUNA_STORAGE`` (inherited from the driver: submitit's local jobs
    copy the environment, and sbatch exports it unless a profile says ``--export=NONE``)."""
    if "***" not in shown:
        return shown
    real = os.environ.get(STORAGE_ENV, "")
    if real and mask_url(real) == shown:
        return real
    raise SweepError(f"--storage {shown}: the password is not in this worker's environment "
                     f"({STORAGE_ENV} is {'another URL' if real else 'unset'}); a Slurm profile "
                     f"must export the environment (sbatch's default, --export=ALL)")


def make_storage(url: str) -> "optuna.storages.BaseStorage":
    """``journal:PATH`` (or a plain path) -> JournalStorage on a file; an RDB URL -> RDBStorage.

    SQLite is accepted only for a local file and with a warning: on a network filesystem its
    locking corrupts or hangs (optuna's own advice; see the shared notes). Errors and logs show
    the URL with its password masked (:func:`mask_url`).
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" not in url:
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url)
        if path.is_dir():
            raise SweepError(f"--storage {url}: is a directory, expected a journal file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    shown = mask_url(url)
    if url.startswith("sqlite:"):
        logger.warning("SQLite storage %s: safe only on a local disk with one machine; use the "
                       "journal file (the default) on a shared filesystem", shown)
    try:
        return RDBStorage(url)
    except (ImportError, ModuleNotFoundError) as e:
        raise SweepError(f"--storage {shown}: the database driver is not installed "
                         f"({scrub(_first_line(e), url)})") from None
    except Exception as e:  # sqlalchemy's errors: bad URL, unreachable server
        raise SweepError(f"--storage {shown}: cannot open ({type(e).__name__}: "
                         f"{scrub(_first_line(e), url)})") from None


def _first_line(error: BaseException) -> str:
    """The first line of an error (sqlalchemy's end with a paragraph of links)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _sampler(spec: SweepSpec, stream: int = 0) -> "optuna.samplers.BaseSampler":
    """The sampler of ``spec``. A declared seed is mixed with ``stream`` (one per worker and
    invocation): workers seeded alike would propose the same random start-up points."""
    import optuna

    kw = {k: v for k, v in spec.sampler.items() if k != "name"}
    if kw.get("seed") is not None and stream:
        kw["seed"] = (int(kw["seed"]) + 7919 * stream) % (2 ** 31)
    name = spec.sampler["name"]
    try:
        if name == "tpe":
            kw.setdefault("multivariate", True)
            return optuna.samplers.TPESampler(**kw)
        if name == "random":
            return optuna.samplers.RandomSampler(**kw)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(**kw)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(**kw)
        space = {p.key: list(range(len(p.choices))) if any(isinstance(c, tuple) for c in p.choices)
                 else list(p.choices) for p in spec.space if p.type == "categorical"}
        if len(space) != len(spec.space):
            raise SweepError(f"{spec.where}: key 'sampler': grid needs categorical parameters only")
        return optuna.samplers.GridSampler(space, **kw)
    except TypeError as e:
        raise SweepError(f"{spec.where}: key 'sampler': {e}") from None


def _pruner(spec: SweepSpec) -> "optuna.pruners.BasePruner":
    import optuna

    kw = {k: v for k, v in spec.pruner.items() if k != "name"}
    cls = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "hyperband": optuna.pruners.HyperbandPruner,
           "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}[spec.pruner["name"]]
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise SweepError(f"{spec.where}: key 'pruner': {e}") from None


def open_study(spec: SweepSpec, storage: Any, create: bool = False,
               stream: int = 0) -> "optuna.Study":
    """The shared study of ``spec`` (created once by the driver, then only loaded).

    A study that exists with other objectives is refused: its trials would not compare.
    """
    import optuna

    if isinstance(storage, str):
        storage = make_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = list(spec.directions)
    if create:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions,
                                    sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
        got = [d.name.lower() for d in study.directions]
        if got != directions:
            raise SweepError(f"{spec.where}: study '{spec.name}' already exists with directions "
                             f"{got}, not {directions}; give the sweep another name")
        prev = study.user_attrs.get("objectives")
        if prev is not None and list(prev) != list(spec.objectives):
            raise SweepError(f"{spec.where}: study '{spec.name}' already exists with objectives "
                             f"{prev}, not {list(spec.objectives)}; give the sweep another name")
        if prev is None:
            study.set_user_attr("objectives", list(spec.objectives))
            study.set_user_attr("experiment", spec.experiment)
        return study
    try:
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, stream),
                                 pruner=_pruner(spec))
    except KeyError:
        raise SweepError(f"study '{spec.name}' not found in the storage") from None


def _started(study: "optuna.Study") -> int:
    """Trials asked for so far (every state but WAITING: enqueued trials are yet to come)."""
    from optuna.trial import TrialState

    return sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """flock on a shared file (filelock's ``UnixFileLock``; the file stays): ask-and-count must
    be one step across workers, or a study of N trials gets N + (workers - 1)."""
    from filelock import UnixFileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with UnixFileLock(path, mode=0o644, preserve_lock_file=True):
        yield


# ---------------------------------------------------------------------------------------------
# liveness of trials
# ---------------------------------------------------------------------------------------------
def _heartbeat_path(sdir: Path, number: int) -> Path:
    return sdir / "heartbeats" / f"trial{number}"


class _Heartbeat:
    """Touches a trial's heartbeat file every ``interval`` seconds from a daemon thread.

    The kernel gives a SIGKILLed worker no chance to say it died: the file simply stops
    being touched, which is what :func:`fail_stale_trials` looks for.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self.path, self.interval = path, interval
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{path.name}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)


def fail_stale_trials(study: "optuna.Study", sdir: Path, grace_period: float,
                      runs_root: Optional[os.PathLike] = None) -> List[int]:
    """Mark FAIL every RUNNING trial whose worker stopped beating; return their numbers.

    A trial with no heartbeat file at all is judged by its start time. Its run in the store
    (if any) is recorded ``failed`` with the reason, so ``maps status`` agrees with the study.
    """
    import optuna
    from optuna.trial import TrialState

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        hb = _heartbeat_path(sdir, t.number)
        try:
            last = hb.stat().st_mtime
        except FileNotFoundError:
            last = t.datetime_start.timestamp() if t.datetime_start else now
        if now - last <= grace_period:
            continue
        try:  # the reason first: a finished trial takes no more attributes
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                               f"worker died: no heartbeat for {now - last:.1f}s")
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process settled it first
        failed.append(t.number)
        run_dir = t.user_attrs.get("run_dir")
        if run_dir and runs_root is not None:
            _mark_run(Path(runs_root), Path(run_dir), "failed",
                      error=f"sweep worker died (no heartbeat for {now - last:.0f}s); trial marked FAIL")
    if failed:
        logger.warning("study %s: trials %s of dead workers marked failed", study.study_name, failed)
    return failed


def _mark_run(runs_root: Path, run_dir: Path, state: str, **fields: Any) -> None:
    from maps.launch.runstore import RunStore

    store = RunStore(runs_root)
    with store.claim(run_dir, timeout_s=30, required=False):
        status = store.read_status(run_dir) or {}
        if status.get("state") in ("queued", "running") or not status:
            store.transition(run_dir, state, **fields)


