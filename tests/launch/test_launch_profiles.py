"""Cluster profiles: the shipped ones load, and every mistake names the file and the key."""
from pathlib import Path

import pytest

from maps.errors import ConfigError
from maps.launch import ClusterProfile, load_profile, make_executor

PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


def test_shipped_profiles_load():
    ci = load_profile(PROFILES / "local-ci.yaml")
    assert (ci.partition, ci.gpus_per_node, ci.ntasks_per_node, ci.timeout_min) == ("debug", 0, 1, 30)
    a100 = load_profile(PROFILES / "a100.yaml")
    # one process per GPU
    assert (a100.gpus_per_node, a100.ntasks_per_node, a100.world_size) == (8, 8, 8)
    h100 = load_profile(PROFILES / "h100.yaml")
    assert (h100.nodes, h100.ntasks_per_node, h100.world_size) == (2, 4, 8)
    assert h100.setup[0] == "module load cuda/12.4"
    assert h100.resources()["tasks_per_node"] == 4


def _write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("partition: gpu\ngpu_per_node: 2\n", r"p.yaml: unknown key 'gpu_per_node'"),
    ("nodes: two\n", r"p.yaml: key 'nodes' must be int, got 'two'"),
    ("nodes: 0\n", r"p.yaml: key 'nodes' must be >= 1, got 0"),
    ("timeout_min: true\n", r"p.yaml: key 'timeout_min' must be int"),
    ("setup: [1, 2]\n", r"p.yaml: key 'setup' must be a list of shell lines"),
    ("gpus_per_node: 4\ntasks_per_node: 2\n", r"p.yaml: key 'tasks_per_node' is 2 but gpus_per_node is 4"),
    ("additional_parameters: {dependency: afterok:1}\n", r"p.yaml: key 'additional_parameters' may not set \['dependency'\]"),
    ("- a\n- b\n", r"p.yaml: a cluster profile is a mapping"),
    ("partition: [\n", r"p.yaml: not valid YAML"),
])
def test_profile_errors_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_profile(_write(tmp_path, text))


def test_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cluster profile not found"):
        load_profile(tmp_path / "nope.yaml")


def test_no_profile_means_defaults():
    p = load_profile(None)
    assert p == ClusterProfile() and p.world_size == 1


def test_local_executor_gets_tasks_and_timeout(tmp_path):
    prof = ClusterProfile(tasks_per_node=2, timeout_min=7)
    ex = make_executor("local", tmp_path / "%j", prof, "maps-x")
    assert ex.parameters["tasks_per_node"] == 2 and ex.parameters["timeout_min"] == 7
