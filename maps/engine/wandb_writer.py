"""A detectron2 ``EventWriter`` that logs to Weights & Biases, and never stops training.

Three rules shape it (see shared notes on wandb 0.31):

* The mode is decided *before* ``wandb.init``: online only when the user configured W&B (an
  API key in ``WANDB_API_KEY`` or a ``wandb login`` netrc entry) and did not ask for
  offline/disabled. Online without a key raises at once or prompts on a TTY; with a key but
  no network ``init`` blocks for minutes: so no key means offline. With a key, the server is
  first asked for any HTTP answer, at most ``REACH_TIMEOUT_S`` (5 s): an unreachable server
  costs a run 5 s, not ``init_timeout``, and the run logs offline (one warning; ``wandb sync``
  uploads it later). An online ``init`` that fails anyway also falls back to offline.
* A W&B failure (init or log) is logged once as a warning and the writer becomes a no-op.
* Resume: the run id lives in ``<run_dir>/wandb.json``, written *before* ``wandb.init`` is
  tried, and is reused (``resume="allow"``) by every attempt of a requeued run, offline
  fallbacks included. W&B steps must only increase, so steps W&B already holds are skipped
  (detectron2 replays the iterations after its last checkpoint) and the others are logged
  again: no gap and no duplicate in the history.
* ``last_step`` in wandb.json is a floor W&B has *durably* stored, never ahead of it: it is
  written at start (the highest step in the offline record logs of earlier attempts, or the
  server's resumed step) and after ``finish()`` has flushed the run, never after a mere
  ``log`` (the W&B process of a killed job may not have saved those steps: skipping them on
  resume would leave holes).

The API key is never read into a record: wandb.json holds the id, mode, project, entity, URL
or offline directory, and the last durably logged step.
"""
from __future__ import annotations

import logging
import netrc
import os
import secrets
import struct
import subprocess
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union
from urllib.parse import urlparse

from detectron2.utils.events import EventWriter, get_event_storage

from maps.engine import run_record

logger = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
#: the longest an unreachable W&B server may delay a run before it logs offline instead
REACH_TIMEOUT_S = 5.0


def has_wandb_credentials() -> bool:
    """True if W&B would authenticate without asking: WANDB_API_KEY, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: Optional[str] = None) -> str:
    """The mode to run W&B in: ``mode`` argument, else WANDB_MODE, else online-if-configured.

    An explicit online request without credentials is downgraded to offline with a warning:
    an unattended job must never wait on a login prompt.
    """
    requested = (mode or os.environ.get("WANDB_MODE") or "").strip().lower()
    if requested in ("disabled", "dryrun", "offline"):
        return "disabled" if requested == "disabled" else "offline"
    if requested not in ("", "online", "run"):
        logger.warning("W&B mode %r is not one of %s: logging offline", requested, MODES)
        return "offline"
    if has_wandb_credentials():
        return "online"
    if requested:
        logger.warning("W&B mode 'online' was asked for but no API key is configured "
                       "(WANDB_API_KEY or `wandb login`): logging offline instead")
    return "offline"


def server_url() -> str:
    """The W&B server this process would talk to (WANDB_BASE_URL, else W&B's cloud)."""
    return (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")


def server_unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> Optional[str]:
    """None when ``url`` gives any HTTP answer (an error status included) within ``timeout``
    seconds; else why not, in a few words.

    The request runs in a daemon thread and is waited for ``timeout`` seconds in all (a DNS
    lookup or a server that accepts and never answers cannot stretch it); proxies are taken
    from the environment as W&B takes them. A TLS failure counts as reachable: the network
    path works and W&B, with its own certificate store, decides.
    """
    import ssl
    import urllib.error
    import urllib.request

    outcome: Dict[str, str] = {}
    done = threading.Event()

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # an answer
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ssl.SSLError):
                outcome["why"] = str(e.reason)
        except Exception as e:  # socket timeouts, resets, bad URLs
            outcome["why"] = f"{type(e).__name__}: {e}"
        finally:
            done.set()

    threading.Thread(target=ask, name="wandb-reachability", daemon=True).start()
    if not done.wait(timeout):
        return f"no answer within {timeout:g} s"
    return outcome.get("why")


def persisted_step(run_dir: Union[str, os.PathLike], run_id: str) -> int:
    """The highest history step W&B has written to the offline record logs
    (``<run_dir>/wandb/offline-run-*-<id>/run-<id>.wandb``) of run ``run_id``; -1 if none.

    These files are what ``wandb sync`` uploads: a step is in them or it is lost. The newest
    file with any history decides (steps only increase across attempts); a record cut short by
    a kill is not counted.
    """
    files = sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"), reverse=True)
    for path in files:
        steps = [r.history.step.num for r in offline_records(path) if r.WhichOneof("record_type") == "history"]
        if steps:
            return max(steps)
    return -1


_BLOCK, _HEADER = 32 * 1024, 7  # W&B's record log: leveldb-log framing, 32 KiB blocks


def offline_records(path: Path) -> list:
    """The complete Records of one ``run-<id>.wandb`` file, in file order."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        data = path.read_bytes()
    except OSError:
        return []
    out, pos, buf = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if pos + _HEADER + length > len(data):
            break  # cut short
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + _HEADER:pos + _HEADER + length], pos + _HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            try:
                rec.ParseFromString(buf)
            except Exception:
                break
            out.append(rec)
    return out


def git_commit(cwd: Optional[str] = None) -> Optional[str]:
    """Short commit of the code being run, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd or os.path.dirname(__file__),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(experiment: Optional[str] = None, seed: Optional[int] = None, table: Optional[Any] = None,
             extra: Iterable[str] = ()) -> list:
    """Tags a run carries: paper table, experiment, seed, git commit (W&B caps a tag at 64)."""
    tags = [f"table:{table}" if table is not None else None,
            f"exp:{experiment}" if experiment else None,
            f"seed:{seed}" if seed is not None else None]
    commit = git_commit()
    tags.append(f"git:{commit}" if commit else None)
    return [t[:64] for t in [*tags, *extra] if t]


def _config_dict(config: Any) -> Dict[str, Any]:
    """A detectron2 CfgNode, a mapping or YAML text, as plain data for ``wandb.config``."""
    import yaml

    if config is None:
        return {}
    if isinstance(config, str):
        data = yaml.safe_load(config)
    elif hasattr(config, "dump"):
        data = yaml.safe_load(config.dump())
    else:
        data = dict(config)
    return data if isinstance(data, dict) else {"config": data}


class WandbWriter(EventWriter):
    """Log the EventStorage's scalars to W&B at the writer's period (detectron2 ``PeriodicWriter``).

    Args:
        run_dir: the run directory (W&B files go in ``<run_dir>/wandb``; id in wandb.json).
        config: the resolved config (CfgNode, mapping or YAML text), logged as ``wandb.config``.
        tags: run tags; None = :func:`run_tags` of the run's status.json (experiment, seed,
            the paper table named in the experiment, git commit).
        project, entity: W&B destination; ``WANDB_PROJECT`` / ``WANDB_ENTITY`` if not given.
        mode: online / offline / disabled; None decides as :func:`resolve_mode` says.
        window_size: median window of smoothed scalars, as detectron2's other writers.
        init_timeout_s: the longest ``wandb.init`` may take before the writer gives up (on a
            server that answered the reachability check).
        reach_timeout_s: the longest the W&B server may take to give any HTTP answer before
            the run logs offline (online mode only).
        job_type: W&B's job type: ``train``, ``eval``, ``memory`` or ``sweep``.
        extra_config: what maps adds to ``wandb.config`` under ``maps`` (the pretrained files
            with their sha256, the overrides, the keys on random weights).
        group: W&B's group; default the run's experiment (its seeds side by side).
    """

    def __init__(self, run_dir: Union[str, os.PathLike], config: Any = None, tags: Optional[Iterable[str]] = None,
                 project: Optional[str] = None, entity: Optional[str] = None, mode: Optional[str] = None,
                 window_size: int = 20, name: Optional[str] = None, group: Optional[str] = None,
                 init_timeout_s: float = 30.0, reach_timeout_s: float = REACH_TIMEOUT_S,
                 job_type: str = "train", extra_config: Optional[Mapping[str, Any]] = None) -> None:
        self.run_dir = Path(run_dir)
        self.window_size = window_size
        self._run = None
        self._warned = False
        self._last_write: Dict[str, int] = {}
        record = run_record.read_wandb(self.run_dir) or {}
        self._resume_floor = self._last_step = int(record.get("last_step", -1))
        self.mode = resolve_mode(mode)
        if self.mode == "disabled" or not _is_main_process():
            self.mode = "disabled"
            return
        self._record = {
            "id": record.get("id") or secrets.token_hex(4),
            "mode": self.mode,
            "project": project or os.environ.get("WANDB_PROJECT") or record.get("project") or "maps",
            "entity": entity or os.environ.get("WANDB_ENTITY") or record.get("entity"),
        }
        # steps an earlier attempt's W&B durably stored: W&B drops them, or (offline) they
        # would be in the history twice once synced
        self._set_floor(persisted_step(self.run_dir, self._record["id"]))
        # the id is on disk before W&B is tried: every later attempt resumes this run, even
        # when this one is killed inside wandb.init or falls back to offline
        self._save_record()
        identity = _run_identity(self.run_dir)
        if tags is None:
            tags = run_tags(identity.get("experiment"), identity.get("seed"), identity.get("table"))
        if name is None and identity.get("experiment"):
            name = f"{identity['experiment']}/seed{identity.get('seed')}"
        # W&B's own views group the seeds of one experiment and tell the kinds of job apart
        group = group or identity.get("experiment")
        config = {**_config_dict(config), **({"maps": dict(extra_config)} if extra_config else {})}
        args = (config, list(tags), name, group, job_type, init_timeout_s)
        if self.mode == "online":
            why = server_unreachable(server_url(), reach_timeout_s)
            if why is not None:
                self._go_offline(f"W&B server {server_url()} is unreachable ({why})")
        try:
            self._run = self._init(*args)
        except Exception as e:  # never let W&B stop training
            if self.mode != "online":
                self._fail("init", e)
                return
            _teardown_wandb()  # W&B keeps the failed run's id busy in its service process
            self._go_offline(f"W&B online init failed ({type(e).__name__}: {_first_line(e)})")
            try:
                self._run = self._init(*args)
            except Exception as e2:
                self._fail("init", e2)
                return
        if self.mode == "online":
            self._record["url"] = getattr(self._run, "url", None)
            # the server's history of a resumed run ends at starting_step - 1
            self._set_floor(int(getattr(self._run, "starting_step", 0) or 0) - 1)
        else:  # what `wandb sync` takes to upload it later
            files = getattr(self._run, "dir", None)
            self._record["offline_dir"] = str(Path(files).parent) if files else None
        self._save_record()

    # -- W&B calls (each guarded) -----------------------------------------------------------------
    def _init(self, config: Any, tags: list, name: Optional[str], group: Optional[str],
              job_type: str, init_timeout_s: float) -> Any:
        import wandb

        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(
            id=self._record["id"], resume="allow", mode=self.mode, dir=str(self.run_dir),
            project=self._record["project"], entity=self._record["entity"], name=name or self.run_dir.parent.name,
            group=group, job_type=job_type, tags=tags, config=_config_dict(config), reinit="create_new",
            settings=wandb.Settings(init_timeout=init_timeout_s, console="off", silent=True),
        )

    def _go_offline(self, why: str) -> None:
        """Log this attempt offline, under the same run id (said once, as a warning)."""
        self.mode = self._record["mode"] = "offline"
        logger.warning("%s: logging offline under run id %s in %s; upload it later with "
                       "`wandb sync`", why, self._record["id"], self.run_dir / "wandb")

    def _set_floor(self, step: int) -> None:
        """Steps up to ``step`` are in W&B already: never logged again by this attempt."""
        self._resume_floor = max(self._resume_floor, step)
        self._last_step = max(self._last_step, step)

    def _fail(self, what: str, error: BaseException) -> None:
        if not self._warned:
            logger.warning("W&B %s failed (%s: %s); training goes on without W&B logging",
                           what, type(error).__name__, error)
            self._warned = True
        run, self._run = self._run, None
        if run is not None and what != "finish":
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def _save_record(self, last_step: Optional[int] = None) -> None:
        """wandb.json, its ``last_step`` the floor W&B durably holds (``last_step`` is given
        only once W&B has flushed it, after ``finish``)."""
        self._record["last_step"] = self._resume_floor if last_step is None else last_step
        run_record.write_wandb(self.run_dir, {k: v for k, v in self._record.items() if v is not None})

    @property
    def active(self) -> bool:
        """False once W&B is disabled or has failed: every call is then a no-op."""
        return self._run is not None

    @property
    def run_id(self) -> Optional[str]:
        return self._record.get("id") if hasattr(self, "_record") else None

    # -- EventWriter ------------------------------------------------------------------------------
    def write(self) -> None:
        if self._run is None:
            return
        storage = get_event_storage()
        by_step: Dict[int, Dict[str, float]] = defaultdict(dict)
        for key, (value, it) in storage.latest_with_smoothing_hint(self.window_size).items():
            it = int(it)
            if it <= self._resume_floor or it <= self._last_write.get(key, -1):
                continue
            by_step[it][key] = float(value)
            self._last_write[key] = it
        self.log_metrics_by_step(by_step)

    def log_metrics_by_step(self, by_step: Mapping[int, Mapping[str, float]]) -> None:
        """Log ``{step: {name: value}}`` in increasing step order (W&B drops a lower step)."""
        if self._run is None or not by_step:
            return
        try:
            for step in sorted(by_step):
                if step < self._last_step:
                    continue
                self._run.log(dict(by_step[step]), step=step)
                self._last_step = step
        except Exception as e:
            self._fail("log", e)
        # no wandb.json update here: a logged step is not yet a stored one (see the module doc)

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """Put the final metrics (PQ, PQ_th, PQ_st, AP, mIoU) in the run summary."""
        if self._run is None:
            return
        try:
            self._run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        except Exception as e:
            self._fail("summary", e)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()  # returns once W&B has stored (offline) or sent (online) every step
        except Exception as e:
            self._fail("finish", e)
            return
        self._save_record(last_step=self._last_step)


def _run_identity(run_dir: Path) -> Dict[str, Any]:
    """Experiment, seed and paper table of a run, from its status.json (written by the launcher)."""
    import re

    try:
        status = run_record.read_status_file(run_dir) or {}
    except Exception:
        return {}
    experiment = status.get("experiment")
    m = re.search(r"(?:^|/)table(\d+)(?:/|$)", experiment or "")
    return {"experiment": experiment, "seed": status.get("seed"), "table": int(m.group(1)) if m else None}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _teardown_wandb() -> None:
    """Stop W&B's service process after a failed ``init``: it holds the run id, and an
    offline ``init`` under the same id in this process is refused until it is gone."""
    try:
        import wandb

        wandb.teardown()
    except BaseException as e:  # teardown may sys.exit with the service's exit code
        if isinstance(e, KeyboardInterrupt):
            raise
        logger.debug("wandb.teardown after a failed init: %s", e)


def _is_main_process() -> bool:
    try:
        from detectron2.utils import comm

        return comm.is_main_process()
    except Exception:
        return True
