"""Weight files are read as data: pickles admit numpy only, TorchScript archives are never run."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maps.errors import ConfigError
from maps.weights.files import (SafeDetectionCheckpointer, detect_format, load_detectron2_pickle,
                               load_weights_file, read_torchscript_state_dict)


class _Touch:
    """Unpickling this object creates ``path``: the proof that a loader ran the file's code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("protocol", [2, 4])
def test_detectron2_pickle_of_numpy_arrays_loads(tmp_path, protocol):
    model = {"stem.conv1.weight": np.random.rand(4, 3, 7, 7).astype(np.float32),
             "res2.0.conv1.norm.num_batches_tracked": np.array(3)}
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "torchvision",
                                   "matching_heuristics": True}, protocol=protocol))
    data = load_detectron2_pickle(path)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    for k, v in model.items():
        np.testing.assert_array_equal(data["model"][k], v)
    assert detect_format(path) == "pickle"


def test_pickle_calling_any_other_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _Touch(marker)}, "__author__": "x"}))
    with pytest.raises(ConfigError, match=r"evil.pkl: refused: the pickle calls pathlib"):
        load_detectron2_pickle(path)
    assert not marker.exists()
    # detectron2's checkpointers (the trainer's, the verifier's) refuse it the same way
    from maps.engine.checkpoint import RunCheckpointer

    for checkpointer in (RunCheckpointer, SafeDetectionCheckpointer):
        with pytest.raises(ConfigError, match="refused"):
            checkpointer(torch.nn.Linear(1, 1), save_to_disk=False).load(str(path))
    assert not marker.exists()


def test_torchscript_archive_is_read_without_running_its_code(tmp_path, monkeypatch, tiny_clip):
    model = tiny_clip(quick_gelu=True)
    path = tmp_path / "ViT-Tiny.pt"
    torch.jit.trace(model, (torch.randn(1, 3, 224, 224), torch.randint(0, 100, (1, 77))),
                    check_trace=False).save(str(path))
    assert detect_format(path) == "torchscript"

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    state = read_torchscript_state_dict(path)
    reference = model.state_dict()
    assert set(reference) <= set(state)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert load_weights_file(path)[1] == "torchscript"


def test_torchscript_archive_whose_data_pkl_calls_a_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": _Touch(marker)}, protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/code/__torch__.py", "import os\nos.system('touch pwned')\n")
    assert detect_format(path) == "torchscript"
    with pytest.raises(ConfigError,
                       match=r"evil.pt: refused: the TorchScript archive.s data.pkl calls"):
        read_torchscript_state_dict(path)
    assert not marker.exists()


def test_torch_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": _Touch(marker)}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        load_weights_file(path)
    assert not marker.exists()


def test_formats_are_told_by_content_not_name(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(3.0)}
    torch.save(tensors, tmp_path / "x.bin")
    save_file(tensors, str(tmp_path / "x.pkl"))  # a misleading name
    (tmp_path / "junk.pt").write_bytes(b"hello world, not weights")
    assert detect_format(tmp_path / "x.bin") == "torch"
    assert detect_format(tmp_path / "x.pkl") == "safetensors"
    assert torch.equal(load_weights_file(tmp_path / "x.pkl")[0]["a"], tensors["a"])
    with pytest.raises(ConfigError, match="junk.pt: not a weights file"):
        detect_format(tmp_path / "junk.pt")
