"""Files on shared storage: atomic writes, and the marker of the folders maps made.

Atomic writes: a reader sees the old file or the new one, never half of one.

Made-by-maps markers: every folder maps creates and may later delete (a dataset, a memory,
a run directory, the demo's folder) carries ``.maps-made.json`` (its kind and the facts that
tell a stale one from a current one, e.g. the fingerprint of the dataset it was built from).
maps deletes a folder only through :func:`remove_made`, which refuses a folder without the
marker of the expected kind, and a symbolic link: what maps did not make, it never deletes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from maps.errors import MapsError

PathLike = Union[str, os.PathLike]

#: the marker file of a folder maps made (see :func:`mark_made`)
MADE_MARKER = ".maps-made.json"


class NotMadeByMapsError(MapsError):
    """maps was about to delete a folder it did not make (or of another kind): refused."""


def _umask_from_proc() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Without /proc (macOS), the umask can only be read by setting it, which races with threads
# creating files meanwhile: do that once, at import, before maps starts any thread.
_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_by_setting()


def current_umask() -> int:
    """The process umask, read without changing it (Linux: ``/proc/self/status``)."""
    mask = _umask_from_proc()
    return _IMPORT_UMASK if mask is None else mask


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable. Best effort: some file systems refuse to fsync a
    folder (the rename itself has happened either way)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    The file gets the permissions a plain ``open`` would give it (mkstemp's are 0600, which
    would hide records from the other users and jobs of a shared cluster)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename too survives a crash of the machine
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, **kwargs: Any) -> None:
    kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def load_yaml(path: PathLike, text: Optional[str] = None) -> Any:
    """The YAML file ``path`` (or ``text``, read from it) as data: ``yaml.safe_load`` only.

    A tag asking for a Python object (``!!python/object/apply:os.system``) is refused, never
    run. Raises :class:`~maps.errors.ConfigError` naming the file: unreadable, not valid YAML,
    or such a tag.
    """
    import yaml

    from maps.errors import ConfigError

    if text is None:
        try:
            text = Path(path).read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        tag = re.search(r"tag '([^']*)'", str(e.problem or ""))
        where = f", line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        what = ("the tag '" + re.sub(r"^tag:yaml\.org,2002:", "!!", tag.group(1)) + "'") if tag else "a tag"
        raise ConfigError(f"{path}{where}: {what} is refused: maps reads YAML as data "
                          "(safe_load), never as code") from None
    except yaml.YAMLError as e:
        report = " ".join(str(e).replace(' in "<unicode string>",', "").split())
        raise ConfigError(f"{path}: not valid YAML: {report}") from None


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file, read in 4 MiB blocks (banks and weights are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Folders maps made
# ---------------------------------------------------------------------------------------------
def mark_made(path: PathLike, kind: str, **facts: Any) -> Dict[str, Any]:
    """Record that maps made the folder ``path`` as a ``kind`` (``dataset``, ``memory``,
    ``run``, ``demo``, ...); ``facts`` say what it was made from (a dataset fingerprint, ...).

    Call it right after creating the folder, never on a folder that was already there: the
    marker is what later allows maps to delete the folder. Marking a folder maps already
    marked as the same kind adds ``facts`` to its record.
    """
    path = Path(path)
    record = made_by_maps(path, kind) or {"made_by": "maps", "kind": kind}
    record.update(facts)
    atomic_write_json(path / MADE_MARKER, record)
    return record


def made_by_maps(path: PathLike, kind: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The marker record of a folder maps made (of ``kind``, if given), else None.

    A symbolic link is never maps' own: what it points to may be anyone's.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        record = json.loads((path / MADE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("made_by") != "maps":
        return None
    if kind is not None and record.get("kind") != kind:
        return None
    return record


def remove_made(path: PathLike, kind: str) -> bool:
    """Delete the folder ``path`` if maps made it as a ``kind``; False if there is nothing.

    Raises:
        NotMadeByMapsError: ``path`` is a symbolic link, not a folder, has no maps marker, or
            was made as another kind. Nothing is deleted then.
    """
    path = Path(path)
    if path.is_symlink():
        raise NotMadeByMapsError(f"{path} is a symbolic link: not deleting it or what it points to")
    if not path.exists():
        return False
    if not path.is_dir():
        raise NotMadeByMapsError(f"{path} is not a folder maps made: not deleting it")
    record = made_by_maps(path)
    if record is None:
        raise NotMadeByMapsError(f"{path} has no maps marker ({MADE_MARKER}): not deleting it; "
                                 "remove it yourself if it is stale")
    if record.get("kind") != kind:
        raise NotMadeByMapsError(f"{path} was made by maps as a {record.get('kind')!r} folder, "
                                 f"not a {kind!r} one: not deleting it")
    shutil.rmtree(path)
    return True


def make_dir(path: PathLike, kind: str, **facts: Any) -> Optional[Path]:
    """Create the folder ``path`` (with missing parents) and mark it made by maps as ``kind``.

    Returns the top-most folder this call created (``path`` or one of its parents), for
    :func:`unmake_dir`; None when ``path`` already existed: then it is left as it is and
    unmarked (maps did not make it), also when a concurrent process created it first.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return None
    mark_made(path, kind, **facts)
    return top


def unmake_dir(path: PathLike, kind: str, top: Optional[PathLike] = None) -> None:
    """Undo :func:`make_dir`: remove the marked folder ``path`` (see :func:`remove_made`), then
    its parents up to ``top`` that are left empty (the ones the same call created)."""
    path = Path(path)
    remove_made(path, kind)
    if top is None:
        return
    top = Path(top)
    folder = path.parent
    while top == folder or top in folder.parents:
        try:
            folder.rmdir()  # only an empty folder: anything added meanwhile stays
        except OSError:
            return
        folder = folder.parent
