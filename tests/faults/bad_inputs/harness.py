"""The bad-input harness: one bad input through the real ``maps`` command, and the contract.

:func:`check_refused` runs ``maps ARGS`` in a subprocess in the case's workspace and asserts
what a user on a shared cluster file system must be able to rely on:

- the exit status is non-zero;
- stderr holds exactly one ``error: ...`` line (or click's usage error), which names the
  file, key or value at fault (``Case.expect``), and no ``Traceback`` appears anywhere;
- nothing in the workspace outside the case's declared outputs was created, changed
  (content or mode) or deleted: the whole tree is snapshotted before and after, folders and
  symbolic links included, so a tag that runs ``touch PWNED`` or a half-made run folder is
  caught;
- no secret appears in stdout, stderr or any file the command created or changed: every
  case runs with a password planted in the environment (a database URL and a password
  variable), and cases may plant it in their own inputs (``--storage`` URLs).

Cases that need no detectron2 import in the subprocess run by default; those that do are
``slow``. A case that needs a private mount (a read-only folder, a full disk) runs the
command under ``unshare --mount`` and is skipped where that is not allowed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from ..conftest import REPO, maps_env

#: the password planted in every case's environment (and in some cases' inputs)
SECRET = "s3cr3t-pw"
SECRET_ENV = {"MAPS_TEST_DB_URL": f"postgresql://maps:{SECRET}@127.0.0.1:1/maps", "PGPASSWORD": SECRET}
#: a YAML value that runs a shell command if the file is loaded unsafely; the file it would
#: create is in the workspace, so the snapshot sees it
PWNED = "PWNED"
UNSAFE_TAG = f'!!python/object/apply:os.system ["touch {PWNED}"]'

# stderr lines that are not the error: fvcore's import-time warning (filtered by maps.cli in
# the command, but printed by an import before that), tqdm bars, an encoder's random-init note
KNOWN_IMPORT_WARNING = re.compile(r"FutureWarning: `torch\.jit\.script` is deprecated|^\s+warnings\.warn\($")
PROGRESS_BAR = re.compile(r"\d+%\|")
RANDOM_INIT_NOTICE = re.compile(r"no weights file given, random initialisation from seed"
                                r"|random initialisation|randomly initiali[sz]ed")


@dataclass
class Case:
    """One bad input: ``setup(ws, ...)`` prepares the workspace and returns the arguments."""

    name: str
    setup: Callable[..., List[str]]
    expect: str                      # a substring of the error: the file, key or value at fault
    slow: bool = False
    outputs: Sequence[str] = ()      # workspace paths (relative) the command may create or change
    mounts: Sequence[Tuple[str, str]] = ()  # ("ro", rel dir) or ("tmpfs:<size>", rel dir): unshare
    xfail: Optional[str] = None      # reason, for a case that waits for another change
    env: Dict[str, str] = field(default_factory=dict)

    def param(self):
        marks = [pytest.mark.slow] if self.slow else []
        if self.xfail:
            marks.append(pytest.mark.xfail(reason=self.xfail, strict=False))
        return pytest.param(self, id=self.name, marks=marks)


def params(cases: Sequence[Case]) -> list:
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return [c.param() for c in cases]


# -- the workspace ------------------------------------------------------------------------------
def tree_state(root: Path) -> Dict[str, str]:
    """Every entry under ``root``: files by mode and sha256, folders by mode, links by target."""
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir:{stat.S_IMODE(st.st_mode):o}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"file:{stat.S_IMODE(st.st_mode):o}:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "other"
    return out


def _allowed(rel: str, outputs: Sequence[str]) -> bool:
    return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs)


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _command(args: Sequence[str], ws: Path, mounts: Sequence[Tuple[str, str]]) -> List[str]:
    cmd = [sys.executable, "-m", "maps", *args]
    if not mounts:
        return cmd
    script = []
    for kind, rel in mounts:
        d = str(ws / rel)
        if kind == "ro":
            script.append(f"mount --bind '{d}' '{d}' && mount -o remount,bind,ro '{d}'")
        elif kind.startswith("tmpfs:"):
            script.append(f"mount -t tmpfs -o size={kind.split(':', 1)[1]} tmpfs '{d}'")
        else:
            raise ValueError(kind)
    return ["unshare", "--mount", "sh", "-c", " && ".join(script) + ' && exec "$@"', "sh", *cmd]


def check_refused(case: Case, args: List[str], ws: Path, env: Dict[str, str]) -> str:
    """Run ``maps args`` in ``ws``; assert the refusal contract; return the error line."""
    if case.mounts and not unshare_works():
        pytest.skip("needs `unshare --mount` (root) for a private read-only or full mount")
    env = {**env, **SECRET_ENV, **case.env}
    before = tree_state(ws)
    done = subprocess.run(_command(args, ws, case.mounts), env=env, cwd=ws, capture_output=True,
                          text=True, timeout=600)
    after = tree_state(ws)
    lines = [l for l in done.stderr.splitlines()
             if l.strip() and not KNOWN_IMPORT_WARNING.search(l) and not PROGRESS_BAR.search(l)
             and not RANDOM_INIT_NOTICE.search(l)]
    assert done.returncode != 0, f"{case.name}: exit 0; stdout {done.stdout[-800:]} stderr {done.stderr[-800:]}"
    assert "Traceback" not in done.stderr + done.stdout, f"{case.name}: {done.stderr[-3000:]}"
    if lines and lines[0].startswith("Usage:"):  # click's usage error: Usage / Try / Error
        assert done.returncode == 2 and lines[-1].startswith("Error: "), lines
        message = lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{case.name}: stderr {lines}"
        message = lines[0]
    assert case.expect in message, f"{case.name}: {message!r} does not name {case.expect!r}"

    created = sorted(k for k in after if k not in before and not _allowed(k, case.outputs))
    deleted = sorted(k for k in before if k not in after and not _allowed(k, case.outputs))
    changed = sorted(k for k in before if k in after and before[k] != after[k] and not _allowed(k, case.outputs))
    assert not (created or deleted or changed), (
        f"{case.name}: workspace touched: created {created[:10]}, deleted {deleted[:10]}, changed {changed[:10]}")
    assert PWNED not in after, f"{case.name}: a YAML tag ran a command"

    assert SECRET not in done.stdout + done.stderr, f"{case.name}: the password was printed"
    for rel, state in after.items():
        if state.startswith("file:") and before.get(rel) != state:
            assert SECRET.encode() not in (ws / rel).read_bytes(), f"{case.name}: the password is in {rel}"

    if os.environ.get("MAPS_FAULTS_LOG"):  # the table of docs/faults.md
        with open(os.environ["MAPS_FAULTS_LOG"], "a") as f:
            f.write(json.dumps({"input": case.name, "exit": done.returncode, "message": message}) + "\n")
    return message


# -- building blocks of the cases ----------------------------------------------------------------
def registry_copy(ws: Path, edit: Callable[[str], str] = lambda t: t, extra: str = "") -> Path:
    """A registry folder: the shipped configs and ``main.yaml`` (the synthetic suite) edited."""
    reg = ws / "registry"
    reg.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "experiments" / "configs", reg / "configs")
    (reg / "main.yaml").write_text(edit((REPO / "experiments" / "synthetic" / "main.yaml").read_text()))
    if extra:
        (reg / "extra.yaml").write_text(extra)
    return reg


def sweep_copy(ws: Path, edit: Callable[[str], str] = lambda t: t) -> Path:
    d = ws / "sweeps"
    d.mkdir(exist_ok=True)
    path = d / "s.yaml"
    path.write_text(edit((REPO / "sweeps" / "synthetic_retrieval.yaml").read_text()))
    return path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, f"{old!r} not in the file: the case no longer tests what it says"
    return text.replace(old, new, 1)


def profile(ws: Path, text: str) -> Path:
    path = ws / "p.yaml"
    path.write_text(text)
    return path


def launch_dry_run(ws: Path, profile_path: Path) -> List[str]:
    return ["launch", "synthetic/main/maps", "--executor", "local", "--profile", str(profile_path),
            "--dry-run", "--runs-root", str(ws / "runs")]


def run_record(ws: Path, experiment: str = "synthetic/main/maps", seed: int = 0,
               status: Optional[dict] = None) -> Path:
    """A finished run in ``ws/runs`` (status and final records)."""
    run = ws / "runs" / experiment / f"seed{seed}"
    run.mkdir(parents=True)
    status = status if status is not None else {"experiment": experiment, "seed": seed, "state": "done",
                                                "attempt": 1, "executor": "local"}
    (run / "status.json").write_text(json.dumps(status) + "\n")
    (run / "final.json").write_text(json.dumps({"PQ": 1.0, "iteration": 1000}) + "\n")
    return run


__all__ = ["Case", "check_refused", "params", "maps_env", "SECRET", "UNSAFE_TAG", "PWNED",
           "registry_copy", "sweep_copy", "replace_once", "profile", "launch_dry_run", "run_record",
           "tree_state", "unshare_works", "REPO"]
