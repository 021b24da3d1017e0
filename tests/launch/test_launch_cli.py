"""``maps launch`` and ``maps status`` through click, with a stand-in registry of toy runs."""
import json
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
from click.testing import CliRunner

import maps.commands.launch as launch_cmd
from maps.cli import main
from maps.launch.runstore import RunStore


@dataclass(frozen=True)
class ToyExperiment:
    name: str
    seeds: Tuple[int, ...] = (0, 1)
    eval_of: Optional[str] = None

    def memory_spec(self, cfg=None):
        return None

    @property
    def canonical_name(self):
        return self.name

    def run_name(self, seed):
        return f"{self.name}/seed{seed}"

    def build_config(self, seed=None):
        return f"TOY: {{STEPS: 2}}\nSEED: {seed}\n"


class ToyRegistry:
    def runs(self, selector):
        return [e for e in (ToyExperiment("toy/a"), ToyExperiment("toy/b", (5,))) if e.name.startswith(selector)]


@pytest.fixture
def toy_registry(monkeypatch):
    monkeypatch.setattr(launch_cmd, "_load_registry", lambda: ToyRegistry())
    monkeypatch.setattr(launch_cmd, "TRAIN_TASK", "maps_toy_tasks:toy_train")


def test_launch_then_status(tmp_path, toy_registry):
    root = str(tmp_path / "runs")
    r = CliRunner().invoke(main, ["launch", "toy", "--executor", "debug", "--runs-root", root])
    assert r.exit_code == 0, r.output
    assert "3 of 3 runs submitted" in r.output
    store = RunStore(root)
    assert [(x.experiment, x.seed, x.state) for x in store.iter_runs()] == [
        ("toy/a", 0, "done"), ("toy/a", 1, "done"), ("toy/b", 5, "done")]

    r = CliRunner().invoke(main, ["launch", "toy/a", "--seeds", "3", "--executor", "debug", "--runs-root", root])
    assert r.exit_code == 0, r.output
    assert "1 of 3 runs submitted" in r.output

    r = CliRunner().invoke(main, ["status", "toy/a", "--runs-root", root, "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [(x["seed"], x["state"], x["PQ"]) for x in rows] == [(0, "done", 40.0), (1, "done", 41.0), (2, "done", 42.0)]

    r = CliRunner().invoke(main, ["status", "toy/*", "--runs-root", root])
    assert r.exit_code == 0 and "4 done" in r.output


def test_launch_dry_run_prints_resources_and_submits_nothing(tmp_path, toy_registry):
    root = tmp_path / "runs"
    profile = tmp_path / "p.yaml"
    profile.write_text("partition: gpu\ngpus_per_node: 2\n")
    r = CliRunner().invoke(main, ["launch", "toy/b", "--dry-run", "--profile", str(profile), "--runs-root", str(root)])
    assert r.exit_code == 0, r.output
    assert '"gpus_per_node": 2' in r.output and "1 of 1 runs would be submitted" in r.output
    assert not root.exists()


def test_bad_profile_is_one_line_exit_2(tmp_path, toy_registry):
    profile = tmp_path / "p.yaml"
    profile.write_text("partitoin: gpu\n")
    r = CliRunner().invoke(main, ["launch", "toy", "--profile", str(profile), "--runs-root", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {profile}: unknown key 'partitoin' (did you mean 'partition'?); " + \
        "allowed: account, additional_parameters, array_parallelism, constraint, cpus_per_task, exclusive, " + \
        "gpus_per_node, max_num_timeout, mem_gb, nodes, partition, qos, sbatch_args, seconds_per_iter, " + \
        "setup, signal_delay_s, srun_args, tasks_per_node, timeout_min"


def test_launch_without_a_registry_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "maps.registry", None)  # import fails
    r = CliRunner().invoke(main, ["launch", "table6", "--runs-root", str(tmp_path)])
    assert r.exit_code == 2
    assert "maps launch needs the experiment registry (maps.registry), which cannot be imported" in r.output


def test_status_of_an_empty_store(tmp_path):
    r = CliRunner().invoke(main, ["status", "--runs-root", str(tmp_path / "none")])
    assert r.exit_code == 0 and "no runs match '*'" in r.output
