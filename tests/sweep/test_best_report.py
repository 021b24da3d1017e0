"""After a study: --best, --register (registry round trip) and --report."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from maps.registry import load_registry
from maps.registry.checks import _differences
from maps.sweep import SweepError, base_config, open_study, parse_sweep, run_sweep
from maps.sweep.report import best_trials, register_best, write_report
from maps_toy_objectives import toy_pq

from .conftest import toy_sweep


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    """A finished 5-trial toy study (TPE, seed 0) and its spec and storage (read-only)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "disabled")
    try:
        spec = parse_sweep(toy_sweep())
        result = run_sweep(spec, trials=5, executor="debug",
                           runs_root=tmp_path_factory.mktemp("toy") / "runs")
    finally:
        mp.undo()
    assert result.counts == {"COMPLETE": 5}
    return spec, result.storage


def _pq_of(params):
    cfg = {"MODEL": {"MAPS": {"NUM_RETRIEVED": params["MODEL.MAPS.NUM_RETRIEVED"],
                              "INPUT_MASKING_PROB": params["MODEL.MAPS.INPUT_MASKING_PROB"],
                              "SCENE_LAYERS": params["MODEL.MAPS.SCENE_LAYERS"]}},
           "SOLVER": {"MEMORY_MULTIPLIER": 1.0}}
    return toy_pq(cfg)


def test_best_is_the_highest_pq_with_decoded_values(toy_study):
    spec, storage = toy_study
    study = open_study(spec, storage)
    [best] = best_trials(spec, storage)
    assert best.values["PQ"] == max(t.values[0] for t in study.trials)
    assert isinstance(best.params["MODEL.MAPS.SCENE_LAYERS"], list)  # an index in optuna, a list here
    assert best.values["PQ"] == _pq_of(best.params)
    assert best.metrics["PQ"] == best.values["PQ"] and best.metrics["mIoU"] == best.values["PQ"] + 10


def test_register_best_round_trips_through_the_registry(toy_study, experiments_copy):
    spec, storage = toy_study
    [best] = best_trials(spec, storage)
    path = register_best(spec, best, "synthetic/sweeps/toy-best", experiments_root=experiments_copy)
    assert path == experiments_copy / "synthetic" / "main.yaml"
    assert path.read_text().startswith("# The synthetic suite's main-results table")  # comments kept

    registry = load_registry(experiments_copy)  # validated again, configs and all
    exp = registry.get("synthetic/sweeps/toy-best")
    assert exp.run_name(2) == "synthetic/sweeps/toy-best/seed2" and exp.seeds == (0, 1, 2)
    cfg = exp.build_config(seed=1)
    for key, value in best.params.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert (list(node) if isinstance(node, (list, tuple)) else node) == value
    # the same run as the study's trial: the sweep's base config plus the best values
    expected = base_config(spec, registry, seed=1)
    from maps.registry import apply_overrides

    apply_overrides(expected, best.params, "test")
    assert _differences(cfg, expected) == []

    with pytest.raises(SweepError, match="already exists"):
        register_best(spec, best, "synthetic/sweeps/toy-best", experiments_root=experiments_copy)
    with pytest.raises(SweepError, match="not a valid experiment name"):
        register_best(spec, best, "Best", experiments_root=experiments_copy)


def test_register_refuses_a_file_it_cannot_extend_and_leaves_it_unchanged(toy_study, experiments_copy):
    spec, storage = toy_study
    [best] = best_trials(spec, storage)
    main = experiments_copy / "synthetic" / "main.yaml"
    text = main.read_text() + "notes: entries is not the last key any more\n"
    main.write_text(text)
    with pytest.raises(SweepError, match="add it by hand"):
        register_best(spec, best, "synthetic/sweeps/toy-best", experiments_root=experiments_copy)
    assert main.read_text() == text


def test_report_writes_plots_and_summary(toy_study, tmp_path):
    spec, storage = toy_study
    files = write_report(spec, storage, tmp_path / "results")
    assert files["history"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["importances"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = files["summary"].read_text()
    [best] = best_trials(spec, storage)
    assert f"| {best.number} | {best.values['PQ']:.4g} |" in summary
    assert summary.count("| complete |") == 5
    for key in ("MODEL.MAPS.NUM_RETRIEVED", "MODEL.MAPS.INPUT_MASKING_PROB", "MODEL.MAPS.SCENE_LAYERS"):
        assert f"- `{key}`: " in summary


def test_multi_objective_best_is_the_pareto_front(runs_root):
    spec = parse_sweep(toy_sweep(objective=["PQ", "params"], direction=["maximize", "minimize"]))
    result = run_sweep(spec, trials=5, executor="debug", runs_root=runs_root)
    points = [tuple(t.values) for t in open_study(spec, result.storage).trials]
    front = best_trials(spec, result.storage)

    def dominated(p):
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)

    assert sorted((b.values["PQ"], b.values["params"]) for b in front) == sorted(
        set(p for p in points if not dominated(p)))


def test_cli_best_register_and_report(toy_study, experiments_copy, tmp_path, monkeypatch):
    from maps.cli import main

    spec, storage = toy_study
    runs_root = storage[len("journal:"):].rsplit("/sweep/", 1)[0]
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "toy.yaml").write_text(yaml.safe_dump(toy_sweep()))
    monkeypatch.setenv("MAPS_SWEEPS", str(sweeps))
    monkeypatch.setenv("MAPS_EXPERIMENTS", str(experiments_copy))
    runner = CliRunner()
    out = runner.invoke(main, ["sweep", "toy", "--best", "--json", "--runs-root", str(runs_root)])
    assert out.exit_code == 0, out.output
    [best] = json.loads(out.output)
    out = runner.invoke(main, ["sweep", "toy", "--best", "--register", "synthetic/sweeps/toy-cli",
                               "--runs-root", str(runs_root)])
    assert out.exit_code == 0, out.output
    assert f"best trial {best['trial']}" in out.output and "registered synthetic/sweeps/toy-cli" in out.output
    assert load_registry(experiments_copy, validate=False).get("synthetic/sweeps/toy-cli").overrides[
        "MODEL.MAPS.NUM_RETRIEVED"] == best["params"]["MODEL.MAPS.NUM_RETRIEVED"]
    out = runner.invoke(main, ["sweep", "toy", "--report", "--out", str(tmp_path / "rep"),
                               "--runs-root", str(runs_root)])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "rep" / "summary.md").is_file()
    out = runner.invoke(main, ["sweep", "toy", "--register", "x/y", "--runs-root", str(runs_root)])
    assert out.exit_code == 2 and "--register needs --best" in out.output
