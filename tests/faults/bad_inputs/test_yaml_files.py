"""Every YAML maps reads is data: an unsafe tag is refused (one line naming the file), never
run, in each kind of file: registry files, sweeps, profiles, config files and their _BASE_
chain, a run's config.yaml. The tag would ``touch PWNED`` in the workspace if it ran."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .harness import (REPO, UNSAFE_TAG, Case, check_refused, launch_dry_run, maps_env, params, profile,
                      registry_copy, replace_once, run_record, sweep_copy)

TINY = REPO / "experiments" / "configs" / "synthetic" / "tiny.yaml"


# -- registry (experiments) files ----------------------------------------------------------------
def registry_tag_in_entry(ws):
    reg = registry_copy(ws, lambda t: replace_once(t, "iterations: 1000", f"iterations: {UNSAFE_TAG}"))
    return ["list", "--registry", str(reg)]


def registry_tag_on_a_key(ws):
    reg = registry_copy(ws, lambda t: replace_once(t, "title:", f"? {UNSAFE_TAG}\n: x\ntitle:"))
    return ["list", "--registry", str(reg)]


def registry_python_name_tag(ws):
    reg = registry_copy(ws, extra="table: 2\nsuite: synthetic\nentries: !!python/name:os.system\n")
    return ["list", "--registry", str(reg)]


def registry_custom_tag(ws):
    reg = registry_copy(ws, extra="table: 2\nsuite: synthetic\nentries: !include secrets.yaml\n")
    return ["list", "--registry", str(reg)]


def registry_tag_in_an_entrys_base_config(ws):
    reg = ws / "experiments"
    shutil.copytree(REPO / "experiments", reg)
    tiny = reg / "configs" / "synthetic" / "tiny.yaml"
    tiny.write_text(tiny.read_text() + f"VIS_PERIOD: {UNSAFE_TAG}\n")
    return ["show", "synthetic/main/mask2former", "--registry", str(reg)]


# -- sweep files -----------------------------------------------------------------------------------
def sweep_tag_in_space(ws):
    s = sweep_copy(ws, lambda t: replace_once(t, "{type: int, low: 1, high: 8}", UNSAFE_TAG))
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


def sweep_tag_at_top(ws):
    s = sweep_copy(ws, lambda t: t + f"seed: {UNSAFE_TAG}\n")
    return ["sweep", str(s), "--trials", "1", "--executor", "debug", "--runs-root", str(ws / "runs")]


def sweep_python_module_tag(ws):
    s = sweep_copy(ws, lambda t: replace_once(t, "objective: PQ", "objective: !!python/module:os"))
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


# -- cluster profiles ------------------------------------------------------------------------------
def profile_tag(ws):
    return launch_dry_run(ws, profile(ws, f"partition: {UNSAFE_TAG}\n"))


def profile_tag_in_setup_list(ws):
    return launch_dry_run(ws, profile(ws, f"partition: gpu\nsetup:\n  - {UNSAFE_TAG}\n"))


def profile_object_new_tag(ws):
    return launch_dry_run(ws, profile(ws, "partition: !!python/object/new:subprocess.Popen [[touch, PWNED]]\n"))


# -- detectron2 config files (maps show / maps train --config) -------------------------------------
def _config(ws: Path, name: str, text: str) -> Path:
    path = ws / name
    path.write_text(text)
    return path


def config_tag(ws):
    c = _config(ws, "c.yaml", f"_BASE_: {TINY}\nSOLVER:\n  MAX_ITER: {UNSAFE_TAG}\n")
    return ["show", "--config", str(c)]


def config_tag_in_base(ws):
    _config(ws, "base.yaml", f"_BASE_: {TINY}\nSOLVER:\n  MAX_ITER: {UNSAFE_TAG}\n")
    c = _config(ws, "c.yaml", "_BASE_: base.yaml\nSEED: 3\n")
    return ["show", "--config", str(c)]


def config_tag_in_a_base_of_a_base(ws):
    _config(ws, "b2.yaml", f"_BASE_: {TINY}\nSEED: {UNSAFE_TAG}\n")
    _config(ws, "b1.yaml", "_BASE_: b2.yaml\n")
    c = _config(ws, "c.yaml", "_BASE_: [b1.yaml]\n")
    return ["show", "--config", str(c)]


def config_tag_train(ws):
    c = _config(ws, "c.yaml", f"_BASE_: {TINY}\nSOLVER:\n  BASE_LR: {UNSAFE_TAG}\n")
    return ["train", "--config", str(c), "--output", str(ws / "run")]


def config_tag_in_a_runs_config_yaml(ws):
    # a run's resolved config, reused as the config of a new training (a common habit)
    run = run_record(ws)
    (run / "config.yaml").write_text(TINY.read_text() + f"OUTPUT_DIR: {UNSAFE_TAG}\n")
    return ["train", "--config", str(run / "config.yaml"), "--output", str(ws / "run2")]


def config_remote_base(ws):
    c = _config(ws, "c.yaml", "_BASE_: https://example.invalid/evil.yaml\n")
    return ["show", "--config", str(c)]


def config_base_cycle(ws):
    _config(ws, "a.yaml", "_BASE_: b.yaml\n")
    c = _config(ws, "b.yaml", "_BASE_: a.yaml\n")
    return ["show", "--config", str(c)]


def config_not_a_mapping(ws):
    return ["show", "--config", str(_config(ws, "c.yaml", "- SOLVER\n- MAX_ITER\n"))]


def config_base_not_a_path(ws):
    return ["show", "--config", str(_config(ws, "c.yaml", "_BASE_: {a: 1}\n"))]


def config_binary_file(ws):
    path = ws / "c.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    return ["show", "--config", str(path)]


def config_group_over_value(ws):
    c = _config(ws, "c.yaml", f"_BASE_: {TINY}\nSEED:\n  VALUE: 1\n")
    return ["show", "--config", str(c)]


CASES = [
    Case("registry: unsafe tag in an entry", registry_tag_in_entry, "main.yaml"),
    Case("registry: unsafe tag on a key", registry_tag_on_a_key, "main.yaml"),
    Case("registry: python/name tag", registry_python_name_tag, "extra.yaml"),
    Case("registry: custom !include tag", registry_custom_tag, "extra.yaml"),
    Case("sweep: unsafe tag in the space", sweep_tag_in_space, "s.yaml"),
    Case("sweep: unsafe tag at the top level", sweep_tag_at_top, "s.yaml"),
    Case("sweep: python/module tag", sweep_python_module_tag, "s.yaml"),
    Case("profile: unsafe tag", profile_tag, "p.yaml"),
    Case("profile: unsafe tag in setup", profile_tag_in_setup_list, "p.yaml"),
    Case("profile: object/new tag", profile_object_new_tag, "p.yaml"),
]
SLOW_CASES = [
    Case("registry: unsafe tag in an entry's base config", registry_tag_in_an_entrys_base_config,
         "tiny.yaml, line", slow=True),
    Case("config: unsafe tag", config_tag, "c.yaml, line 3: the tag '!!python/object/apply:os.system' is refused", slow=True),
    Case("config: unsafe tag in its _BASE_", config_tag_in_base, "base.yaml, line 3", slow=True),
    Case("config: unsafe tag two _BASE_ levels up", config_tag_in_a_base_of_a_base, "b2.yaml, line 2", slow=True),
    Case("train: unsafe tag in --config", config_tag_train, "c.yaml, line 3", slow=True),
    Case("train: unsafe tag in a run's config.yaml", config_tag_in_a_runs_config_yaml, "config.yaml, line", slow=True),
    Case("config: remote _BASE_ URL", config_remote_base, "only local files are read", slow=True),
    Case("config: _BASE_ cycle", config_base_cycle, "is a cycle of bases", slow=True),
    Case("config: not a mapping", config_not_a_mapping, "c.yaml: expected a mapping", slow=True),
    Case("config: _BASE_ not a path", config_base_not_a_path, "_BASE_ must be a file path", slow=True),
    Case("config: binary file", config_binary_file, "c.yaml", slow=True),
    Case("config: group over a value of the base", config_group_over_value, "SEED", slow=True),
]


@pytest.mark.parametrize("case", params(CASES + SLOW_CASES))
def test_yaml_is_data(case, tmp_path):
    args = case.setup(tmp_path)
    check_refused(case, args, tmp_path, maps_env())
