"""Admitting a file to the cache: hash it, load it with the library's own loader into the
architecture maps builds (keys, shapes, activation), and only then keep it; fetching it first
with the library's own download (detectron2's PathManager, open_clip's tags, timm's hub)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

from maps.errors import ConfigError
from maps.io import atomic_write_json, file_sha256

from maps.weights.cache import MANIFEST, PretrainedWeight, WeightsError, _SUFFIX, _entry_dir, _fix_hint, get_weight, read_manifest, weights_dir

logger = logging.getLogger(__name__)


def verify_content(entry: PretrainedWeight, path: Path) -> None:
    """Load ``path`` with the library's loader into the architecture maps builds.

    Raises:
        ConfigError: unreadable, wrong format or layout, keys or shapes that do not fit, or a
            CLIP activation other than the architecture's.
    """
    from maps.weights.files import detect_format

    fmt = detect_format(path)
    if fmt not in entry.formats:
        raise ConfigError(f"{entry.name} is a {'/'.join(entry.formats)} file, this is {fmt}")
    if entry.kind == "resnet":
        _verify_detectron2_resnet(path)
    elif entry.kind == "clip":
        from maps.memory.encoders import ClipBackbone

        ClipBackbone(entry.arch, str(path), seed=0, declared_activation=entry.activation)
    elif entry.kind == "dino":
        from maps.memory.encoders import DinoBackbone

        DinoBackbone(entry.arch, str(path), seed=0)
    else:  # pragma: no cover - the table above has no other kind
        raise ConfigError(f"no verifier for {entry.kind}")


def build_paper_resnet50():
    """The R50 backbone of the paper's configs (torchvision layout: stride in the 3x3,
    FrozenBN), as detectron2's ``build_resnet_backbone`` builds it."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from maps.config import get_maps_cfg

    cfg = get_maps_cfg()
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.STRIDE_IN_1X1, r.NORM = 50, False, "FrozenBN"
    r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _verify_detectron2_resnet(path: Path) -> None:
    import numpy as np

    from maps.weights.files import SafeDetectionCheckpointer, load_detectron2_pickle

    data = load_detectron2_pickle(path)
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise ConfigError("not detectron2's layout {'model': {name: array}, '__author__': ...}")
    bad = [k for k, v in data["model"].items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ConfigError(f"'model' holds non-arrays, e.g. {bad[0]}")
    backbone = build_paper_resnet50()
    ckpt = SafeDetectionCheckpointer(backbone, save_to_disk=False)
    # torchvision's fc and num_batches_tracked are unused by design: not worth 60 log lines
    ckpt.logger = logging.getLogger("maps.weights.verify")
    ckpt.logger.propagate, ckpt.logger.disabled = False, True
    ckpt.load(str(path), checkpointables=[])
    inc = ckpt.last_incompatible
    shapes = list(getattr(inc, "incorrect_shapes", []) or [])
    if shapes:
        key, have, want = shapes[0]
        raise ConfigError(f"{len(shapes)} tensors have the wrong shape for R50, e.g. {key} "
                          f"{tuple(have)} != {tuple(want)}")
    if inc.missing_keys:
        raise ConfigError(f"{len(inc.missing_keys)} R50 tensors are missing, e.g. "
                          f"{sorted(inc.missing_keys)[:3]}")


def _copy_durably(src: Path, dst_dir: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".adding-", suffix=suffix, dir=dst_dir)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable as a plain copy would be (shared caches)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def add_weight(name: str, file: str | os.PathLike, source: str = "user") -> Dict[str, Any]:
    """Copy ``file`` into the cache as ``name`` once it is verified; return its manifest.

    The copy is written beside its final place, fsynced, hashed and verified, and only then
    renamed over the cached file; the manifest follows atomically. A file that fails
    verification is refused and nothing of it stays in the cache.

    Raises:
        WeightsError: unknown name, missing file, or a file that fails verification.
    """
    from maps.weights.files import detect_format

    entry = get_weight(name)
    src = Path(file)
    if not src.is_file():
        raise WeightsError(f"{src}: no such file (maps weights add {name} FILE)")
    try:
        fmt = detect_format(src)
    except ConfigError as e:
        raise WeightsError(f"{src}: refused as {name}: {e}") from None
    suffix = _SUFFIX[fmt]
    folder = _entry_dir(name)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = _copy_durably(src, folder, suffix)
    try:
        sha256 = file_sha256(tmp)
        verify_content(entry, tmp)
    except BaseException as e:
        tmp.unlink()
        if created:  # the folder this call made, now empty again
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not isinstance(e, Exception):  # Ctrl-C, SystemExit
            raise
        reason = " ".join(str(e).replace(str(tmp), "the file").split())
        if not isinstance(e, (ConfigError, RuntimeError)):
            reason = f"{type(e).__name__}: {reason}"
        raise WeightsError(f"{src}: refused as {name}: {reason}") from None
    final = folder / f"{name}{suffix}"
    os.replace(tmp, final)
    _fsync_dir(folder)
    st = final.stat()
    manifest = {"name": name, "file": final.name, "sha256": sha256, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "format": fmt, "source": source,
                "original": str(src.resolve()), "architecture": entry.arch,
                "activation": entry.activation, "verified": True,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(folder / MANIFEST, manifest)
    for stale in folder.glob(f"{name}.*"):  # the file of an earlier add in another format
        if stale != final:
            stale.unlink()
    return manifest


def verify_weight(name: str) -> Dict[str, Any]:
    """Re-hash the cached file against its manifest and load it into maps' architecture.

    Raises:
        WeightsError: not cached, hash mismatch, or a load that fails (one line, naming why).
    """
    entry = get_weight(name)
    manifest = read_manifest(name)
    if manifest is None:
        raise WeightsError(f"{name}: not in the cache ({weights_dir()}); {_fix_hint(name)}")
    path = _entry_dir(name) / str(manifest.get("file", ""))
    if not path.is_file():
        raise WeightsError(f"{name}: {path} is missing; {_fix_hint(name)}")
    sha256 = file_sha256(path)
    if sha256 != manifest.get("sha256"):
        raise WeightsError(f"{name}: {path} has sha256 {sha256[:12]}, the manifest says "
                           f"{str(manifest.get('sha256'))[:12]}: the file changed; "
                           f"{_fix_hint(name)}")
    try:
        verify_content(entry, path)
    except (ConfigError, RuntimeError) as e:
        raise WeightsError(f"{name}: {path}: {' '.join(str(e).split())}") from None
    st = path.stat()
    manifest.update(verified=True, size=st.st_size, mtime_ns=st.st_mtime_ns,
                    verified_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_json(_entry_dir(name) / MANIFEST, manifest)
    return manifest


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """TCP reachability of ``host`` (through the HTTPS proxy when one is set), bounded in
    time even where name resolution hangs."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        from urllib.parse import urlparse

        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 8080
    result: List[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout * 2)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Hugging Face hub calls use only the local hub cache while ``offline`` (the hub
    otherwise retries unreachable hosts for most of a minute)."""
    if not offline:
        yield
        return
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    try:
        from huggingface_hub import constants
    except ImportError:
        pass
    old = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Offline, the libraries' progress bars and retry logs would bury the one line that says
    what to do; online they are the user's progress report."""
    if not quiet:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


def _download(entry: PretrainedWeight, workdir: Path) -> Path:
    """The library's own download of ``entry`` to a local file (in its cache or ``workdir``)."""
    if entry.library == "detectron2":
        from detectron2.utils.file_io import PathManager

        return Path(PathManager.get_local_path(entry.source))
    if entry.library == "open_clip":
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        model, tag = entry.source.split(":")
        path = download_pretrained(get_pretrained_cfg(model, tag), cache_dir=str(workdir))
        if not path:
            raise WeightsError(f"open_clip has no pretrained tag {entry.source}")
        return Path(path)
    if entry.library == "timm":
        import timm
        import torch

        model = timm.create_model(entry.source, pretrained=True, num_classes=0)
        out = workdir / f"{entry.name}.pth"
        torch.save(model.state_dict(), out)
        return out
    raise WeightsError(f"{entry.name}: no fetcher for library {entry.library}")  # pragma: no cover


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def fetch_weight(name: str, timeout: float = 20.0) -> Dict[str, Any]:
    """Download ``name`` with its library's mechanism and add it to the cache.

    Unreachable hosts are detected first (a few seconds); the hub is then asked for its
    local copy only, so an offline machine fails at once instead of retrying.

    Raises:
        WeightsError: one line naming the weight, why, and the ``maps weights add`` way in.
    """
    entry = get_weight(name)
    offline = not any(_reachable(h) for h in entry.hosts)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    workdir = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=_ensure_dir(weights_dir())))
    try:
        with _hub_offline(offline), _quiet(offline):
            try:
                local = _download(entry, workdir)
            except WeightsError:
                raise
            except Exception as e:  # every library has its own network errors
                why = f"no network ({', '.join(entry.hosts)} unreachable)" if offline \
                    else _first_line(e)
                raise WeightsError(
                    f"cannot fetch {name} ({entry.library}: {entry.source}): {why}; download "
                    f"it where there is network and run `maps weights add {name} FILE`") from None
        return add_weight(name, local, source=f"{entry.library}:{entry.source}")
    finally:
        socket.setdefaulttimeout(previous)
        shutil.rmtree(workdir, ignore_errors=True)  # made above, holds only our download


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


