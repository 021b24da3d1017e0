"""Pretrained weight files read as data: no pickle code and no TorchScript is ever run.

Three formats reach maps from the libraries the paper builds on, and each would normally be
read with a loader that can execute code hidden in the file:

* detectron2's ImageNet backbones (``R-50.pkl``): a plain pickle of ``{"model": {name:
  numpy array}, "__author__": ..., "matching_heuristics": True}``. detectron2's own
  checkpointer reads it with ``pickle.load``, which runs any callable the file names. Here a
  restricted unpickler admits only what a dict of numpy arrays needs.
* OpenAI's CLIP release: a TorchScript archive (a zip of ``data.pkl``, ``data/<storage>``
  and ``code/``). ``torch.jit.load`` compiles and runs the archive's code; here only
  ``data.pkl`` is unpickled, with stand-in objects for the scripted modules and tensors read
  from the ``data/`` records, and the module tree is walked into a state dict.
* Everything else (open_clip and timm state dicts, ``.pth``/``.pt``/``.bin``):
  ``torch.load(weights_only=True)``, or safetensors.

:class:`SafePickleMixin` gives detectron2's checkpointer the numpy-only ``.pkl`` reader (the
trainer's checkpointer uses it, so ``MODEL.WEIGHTS: r50-imagenet`` is read as data);
:class:`SafeDetectionCheckpointer` reads every pretrained format as data.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Tuple

from maps.errors import ConfigError

__all__ = [
    "detect_format",
    "load_detectron2_pickle",
    "read_torchscript_state_dict",
    "load_weights_file",
    "SafePickleMixin",
    "SafeDetectionCheckpointer",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------
# format detection
# --------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """``"pickle"`` | ``"torch"`` (torch.save zip) | ``"torchscript"`` | ``"safetensors"``,
    from the file's first bytes (names lie: OpenAI's TorchScript archive ends in ``.pt``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise ConfigError(f"{path}: truncated or corrupt zip archive") from None
        scripted = any("/code/" in n or n.endswith("/constants.pkl") for n in names)
        return "torchscript" if scripted else "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < (1 << 30) and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise ConfigError(f"{path}: not a weights file (neither a pickle, a torch/TorchScript "
                      "archive nor safetensors)")


# --------------------------------------------------------------------------------------
# detectron2 pickles: numpy arrays only
# --------------------------------------------------------------------------------------
def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    import codecs

    import numpy as np

    try:  # numpy >= 2 (numpy.core is a deprecated alias there)
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray

    allowed: Dict[Tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): codecs.encode,
    }
    # numpy 2 writes numpy._core.*, numpy 1 numpy.core.*: the same two functions
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes, scalars, dicts and lists; refuses every other global."""

    def __init__(self, f, where: str):
        super().__init__(f, encoding="latin1")  # detectron2's older files are Python 2 pickles
        self._allowed = _numpy_globals()
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ConfigError(f"{self._where}: refused: the pickle calls {module}.{name}, which a "
                              "dict of numpy arrays never needs") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ConfigError(f"{self._where}: refused: the pickle has persistent ids (a torch file?)")


def load_detectron2_pickle(path: PathLike) -> Any:
    """The object of a detectron2 ``.pkl`` weights file, unpickled with numpy globals only.

    Raises:
        ConfigError: the file is missing, not a pickle, or names any other global.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            return _NumpyUnpickler(f, path).load()
        except ConfigError:
            raise
        except Exception as e:  # truncated / not a pickle
            raise ConfigError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------
# TorchScript archives: data.pkl only, code never compiled
# --------------------------------------------------------------------------------------
class _ScriptedModule:
    """Stands in for a ``__torch__.*`` class of a TorchScript archive: keeps its attributes."""

    _qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_attrs"] = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, dtype


def _storage_dtypes() -> Dict[str, Any]:
    import torch

    return {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
            "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
            "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
            "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


def _rebuild_tensor(storage, offset: int, size, stride, *_unused):
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, *_unused):
    return data


def _identity(value, *_unused):
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, f, archive: zipfile.ZipFile, prefix: str, where: str):
        super().__init__(f)
        self._archive, self._prefix, self._where = archive, prefix, where
        self._dtypes = _storage_dtypes()
        self._classes: Dict[str, type] = {}
        self._storages: Dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type(name, (_ScriptedModule,), {"_qualname": qual})
            return self._classes[qual]
        if module == "torch" and name in self._dtypes:
            return _StorageType(name, self._dtypes[name])
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch.jit._pickle" and name in ("restore_type_tag", "build_intlist",
                                                      "build_doublelist", "build_boollist",
                                                      "build_tensorlist"):
            return _identity
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise ConfigError(f"{self._where}: refused: the TorchScript archive's data.pkl calls "
                          f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ConfigError(f"{self._where}: refused: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=stype.dtype) if raw else \
                torch.empty(0, dtype=stype.dtype)
            if flat.numel() < int(numel):
                raise ConfigError(f"{self._where}: storage {key} is truncated")
            self._storages[key] = flat
        return self._storages[key]


def _walk(obj: Any, prefix: str, out: Dict[str, Any]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, _ScriptedModule):
        for name, value in obj.__dict__.get("_attrs", {}).items():
            if isinstance(name, str) and not name.startswith("_") and name != "training":
                _walk(value, f"{prefix}.{name}" if prefix else name, out)


def read_torchscript_state_dict(path: PathLike) -> Dict[str, Any]:
    """The parameters and buffers of a TorchScript archive, keyed as ``state_dict()`` would
    key them, without running the archive's code (see the module docstring)."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a readable zip archive ({e})") from None
    with archive:
        data = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(data) != 1:
            raise ConfigError(f"{path}: not a TorchScript archive (no <name>/data.pkl)")
        prefix = data[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise ConfigError(f"{path}: big-endian TorchScript archives are not supported")
        root = _TorchScriptUnpickler(io.BytesIO(archive.read(data[0])), archive, prefix,
                                     path).load()
    out: Dict[str, Any] = {}
    _walk(root, "", out)
    if not out:
        raise ConfigError(f"{path}: the TorchScript archive holds no tensors")
    return out


# --------------------------------------------------------------------------------------
# one entry point
# --------------------------------------------------------------------------------------
def _torch_load(path: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused by torch.load(weights_only=True): "
                          f"{str(e).splitlines()[0]}") from None
    except Exception as e:
        raise ConfigError(f"{path}: cannot read torch file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _safetensors_load(path: str) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise ConfigError(f"{path}: cannot read safetensors file ({e})") from None


_READERS: Dict[str, Callable[[str], Any]] = {
    "pickle": load_detectron2_pickle,
    "torch": _torch_load,
    "torchscript": read_torchscript_state_dict,
    "safetensors": _safetensors_load,
}


def load_weights_file(path: PathLike) -> Tuple[Any, str]:
    """``(content, format)`` of any weights file maps accepts, read as data.

    A ``"pickle"`` that is not a detectron2 numpy pickle may be torch's legacy (pre-zip)
    format: that one goes to ``torch.load(weights_only=True)``.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "pickle":
        try:
            return load_detectron2_pickle(path), fmt
        except ConfigError as numpy_error:
            try:
                return _torch_load(path), "torch"
            except ConfigError:
                raise numpy_error from None
    return _READERS[fmt](path), fmt


# --------------------------------------------------------------------------------------
# detectron2's checkpointer, reading files as data
# --------------------------------------------------------------------------------------
class SafePickleMixin:
    """For a detectron2 ``DetectionCheckpointer`` subclass: ``.pkl`` files (detectron2's
    model-zoo format, e.g. ``R-50.pkl``) are read by the numpy-only unpickler instead of
    ``pickle.load``, and pycls ``.pyth`` files (read with an unrestricted ``torch.load``) are
    refused. Other files go to the checkpointer's own ``_torch_load`` unchanged, so a run's
    own checkpoints (optimizer, RNG states) still resume."""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_detectron2_pickle(filename)
            if not isinstance(data, dict):
                raise ConfigError(f"{filename}: a detectron2 .pkl holds a dict, not "
                                  f"{type(data).__name__}")
            if "model" in data and "__author__" in data:
                return data
            # a Caffe2 / Detectron1 file, as detectron2 reads it
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            raise ConfigError(f"{filename}: pycls .pyth checkpoints are not supported")
        return super()._load_file(filename)


def _detectron2_checkpointer_base():
    from detectron2.checkpoint import DetectionCheckpointer

    return DetectionCheckpointer


class SafeDetectionCheckpointer(SafePickleMixin, _detectron2_checkpointer_base()):
    """detectron2's ``DetectionCheckpointer`` reading every file as data: ``.pkl`` through
    :class:`SafePickleMixin`, torch files by ``torch.load(weights_only=True)``, safetensors
    and TorchScript tensors by :func:`load_weights_file`. For pretrained files (not for a run's
    own checkpoints, whose optimizer and RNG states ``weights_only`` would refuse).

    Everything else (model-zoo layouts, the name-matching heuristics that map
    ``res2.0.conv1.weight`` onto ``backbone.res2.0.conv1.weight``) is detectron2's own.
    :attr:`last_incompatible` keeps what the last load could not match, for verification.
    """

    last_incompatible = None

    def _torch_load(self, f: str) -> Any:
        content, _ = load_weights_file(f)
        return content

    def _load_model(self, checkpoint: Dict[str, Any]):
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible
