"""Sweep files: schema, validation against the experiment's model, and the shipped studies."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from maps.sweep import (ParamSpec, SweepError, load_sweep, parse_sweep, run_sweep, study_dir,
                        trial_config, validate_space)

from .conftest import REPO, toy_sweep


@pytest.mark.parametrize("name", ["retrieval_k", "masking", "synthetic_retrieval"])
def test_shipped_sweeps_validate(name):
    spec = load_sweep(name, root=REPO / "sweeps")
    cfg = validate_space(spec)
    assert spec.name == name and spec.objectives == ("PQ",) and spec.directions == ("maximize",)
    assert cfg.MODEL.MAPS.ENABLED
    if spec.iterations:
        assert cfg.SOLVER.MAX_ITER == spec.iterations


def test_shipped_paper_sweep_scales_schedule():
    spec = load_sweep("retrieval_k", root=REPO / "sweeps")
    cfg = validate_space(spec)
    # ADE20K: drops at 100k and 140k of 160k -> a quarter of the schedule drops at 25k, 35k
    assert cfg.SOLVER.MAX_ITER == 40000 and tuple(cfg.SOLVER.STEPS) == (25000, 35000)
    assert cfg.TEST.EVAL_PERIOD == 5000 and cfg.MODEL.MAPS.POOL_SIZE == 20


def test_trial_config_applies_values_over_the_experiment():
    spec = parse_sweep(toy_sweep())
    cfg = trial_config(spec, {"MODEL.MAPS.NUM_RETRIEVED": 7, "MODEL.MAPS.SCENE_LAYERS": [0, 1]})
    assert cfg.MODEL.MAPS.NUM_RETRIEVED == 7
    assert list(cfg.MODEL.MAPS.SCENE_LAYERS) == [0, 1]
    assert cfg.SOLVER.MAX_ITER == 4 and cfg.TEST.EVAL_PERIOD == 1
    assert cfg.SEED == 0


def test_categorical_lists_are_offered_by_index_and_decoded():
    import optuna

    p = ParamSpec("MODEL.MAPS.SCENE_LAYERS", "categorical", choices=((0, 1, 2), (0, 1)))
    trial = optuna.trial.FixedTrial({"MODEL.MAPS.SCENE_LAYERS": 1})
    assert p.suggest(trial) == [0, 1]
    assert p.decode(0) == [0, 1, 2]
    flat = ParamSpec("SOLVER.OPTIMIZER", "categorical", choices=("ADAMW", "SGD"))
    assert flat.suggest(optuna.trial.FixedTrial({"SOLVER.OPTIMIZER": "SGD"})) == "SGD"


@pytest.mark.parametrize("space, message", [
    ({"MODEL.MAPS.NUM_RETRIVED": {"type": "int", "low": 1, "high": 3}},
     "unknown config key 'MODEL.MAPS.NUM_RETRIVED' (did you mean 'MODEL.MAPS.NUM_RETRIEVED'?)"),
    ({"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 3, "high": 3}},
     "empty range: low 3 must be < high 3"),
    ({"MODEL.MAPS.SCENE_LAYERS": {"type": "categorical", "choices": []}},
     "empty range: 'choices' must be a non-empty list"),
    ({"MODEL.MAPS.INPUT_MASKING_PROB": {"type": "float", "low": 0.0, "high": 1.5}},
     "value 1.5 is invalid for the model: MODEL.MAPS.INPUT_MASKING_PROB: 1.5 is not a probability"),
    ({"MODEL.MAPS.SCENE_LAYERS": {"type": "categorical", "choices": [[0, 1], [0, 9]]}},
     "MODEL.MAPS.SCENE_LAYERS: layer index 9 outside 0..8"),
    ({"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 0, "high": 3}},
     "value 0 is invalid for the model: MODEL.MAPS.NUM_RETRIEVED: k must be >= 1"),
    ({"MODEL.MAPS.NUM_RETRIEVED": {"type": "float", "low": 1, "high": 3}},
     "type float but MODEL.MAPS.NUM_RETRIEVED is an integer key"),
    ({"SOLVER.MAX_ITER": {"type": "int", "low": 1, "high": 3}}, "SOLVER.MAX_ITER cannot be searched"),
    ({"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 1, "high": 3, "choices": [1]}},
     "unknown field 'choices' for type int"),
])
def test_bad_search_spaces_fail_before_any_worker(space, message, runs_root):
    with pytest.raises(SweepError) as err:
        spec = parse_sweep(toy_sweep(space=space))
        run_sweep(spec, trials=2, parallel=2, executor="local", runs_root=runs_root)
    assert message in str(err.value)
    assert "space." in str(err.value)  # names the key at fault
    assert not study_dir(runs_root, "toy").exists()  # no study, no worker


def test_memory_key_refused_for_a_model_without_memory(runs_root):
    spec = parse_sweep(toy_sweep(experiment="synthetic/main/mask2former",
                                 space={"SOLVER.MEMORY_MULTIPLIER": {"type": "float", "low": 0.5, "high": 2.0}}))
    with pytest.raises(SweepError, match="has no memory .*does not have this parameter"):
        run_sweep(spec, trials=1, runs_root=runs_root)
    assert not study_dir(runs_root, "toy").exists()


@pytest.mark.parametrize("changes, message", [
    ({"objective": "PQQ"}, "key 'objective': unknown metric 'PQQ'"),
    ({"direction": "up"}, "key 'direction'"),
    ({"sampler": "bayes"}, "key 'sampler': unknown sampler 'bayes'"),
    ({"objective": ["PQ", "params"], "direction": ["maximize", "minimize"], "pruner": "median"},
     "cannot prune a multi-objective study"),
    ({"experiment": "synthetic/main/mapz"}, "no experiment named 'synthetic/main/mapz'"),
    ({"spaces": {}}, "unknown key 'spaces'"),
    ({"heartbeat": {"interval": 1, "grace": 1}}, "grace > 2 * interval"),
])
def test_bad_sweep_files(changes, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace("*", r"\*")):
        validate_space(parse_sweep(toy_sweep(**changes)))


def test_load_sweep_names_file_and_lists_known(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(toy_sweep(name="mine")))
    assert load_sweep("mine", root=tmp_path).source == tmp_path / "mine.yaml"
    with pytest.raises(SweepError, match=r"no sweep named 'other' in .* \(known: mine\)"):
        load_sweep("other", root=tmp_path)
    (tmp_path / "broken.yaml").write_text("space: [")
    with pytest.raises(SweepError, match="broken.yaml: not valid YAML"):
        load_sweep("broken", root=tmp_path)


def test_cli_bad_space_is_one_line_exit_2(tmp_path, monkeypatch):
    from maps.cli import main

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    bad = toy_sweep(name="bad", space={"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 5, "high": 2}})
    (sweeps / "bad.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("MAPS_SWEEPS", str(sweeps))
    result = CliRunner().invoke(main, ["sweep", "bad", "--runs-root", str(tmp_path / "runs"),
                                       "--parallel", "2"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert "bad.yaml: key 'space.MODEL.MAPS.NUM_RETRIEVED': empty range" in result.output
    assert not (tmp_path / "runs").exists()


def test_each_worker_has_its_own_reproducible_random_stream():
    import optuna

    from maps.sweep.study import _sampler

    spec = parse_sweep(toy_sweep(sampler={"name": "random", "seed": 0}))

    def first_value(stream):
        study = optuna.create_study(sampler=_sampler(spec, stream))
        return study.ask().suggest_float("x", 0.0, 1.0)

    assert first_value(1) == first_value(1)
    assert first_value(1) != first_value(2)
    assert first_value(0) == optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=0)).ask().suggest_float("x", 0.0, 1.0)


def test_a_training_study_of_a_maps_experiment_shares_one_memory_and_toys_need_none():
    from maps.registry import load_registry
    from maps.sweep.spec import DEFAULT_TASK, _sweep_memory, base_config

    registry = load_registry(REPO / "experiments", validate=False)
    spec = load_sweep("synthetic_retrieval", REPO / "sweeps")
    assert spec.task == DEFAULT_TASK
    memory = _sweep_memory(spec, registry, base_config(spec, registry))
    # the bank of the MAPS experiment, queried by its training and evaluation sets
    assert memory["dataset"] == "synthetic_train"
    assert set(memory["query_datasets"]) == {"synthetic_train", "synthetic_val"}
    toy = toy_sweep()
    assert _sweep_memory(parse_sweep(toy), registry,
                         base_config(parse_sweep(toy), registry)) is None


def test_a_layer_choice_that_overlaps_the_other_memory_fails_before_any_worker(runs_root):
    spec = parse_sweep(toy_sweep(space={
        "MODEL.MAPS.SCENE_LAYERS": {"type": "categorical", "choices": [[0, 1, 2], [1, 2, 3]]}}))
    with pytest.raises(SweepError, match=r"value \[1, 2, 3\].*also in OBJECT_LAYERS"):
        run_sweep(spec, trials=1, runs_root=runs_root)
    assert not (runs_root / "sweep").exists()


def test_param_specs_are_validated_by_their_schema():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="empty range: low 3 must be < high 1"):
        ParamSpec("MODEL.MAPS.NUM_RETRIEVED", "int", low=3, high=1)
    bad = {"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": "x", "high": 3}}
    with pytest.raises(SweepError, match=r"key 'space.MODEL.MAPS.NUM_RETRIEVED.low' must be a number, got 'x'"):
        parse_sweep(toy_sweep(space=bad))
    with pytest.raises(SweepError, match=r"key 'heartbeat': unknown key 'beat'; allowed: grace, interval"):
        parse_sweep(toy_sweep(heartbeat={"beat": 1}))
    with pytest.raises(SweepError, match=r"missing key 'experiment' \(the registry experiment the study starts from\)"):
        parse_sweep({k: v for k, v in toy_sweep().items() if k != "experiment"})
    spec = parse_sweep(toy_sweep())
    assert parse_sweep(spec.to_dict()) == spec  # the form a worker job receives


def test_a_study_of_a_paper_experiment_needs_its_weights(tmp_path, monkeypatch):
    """Refused before the study exists, one line per missing file; --allow-random-weights
    passes the check (the trials then record their random keys)."""
    from maps.sweep import parse_sweep, run_sweep
    from maps.sweep.spec import trials_base
    from maps.weights.runs import MissingWeights

    monkeypatch.setenv("MAPS_WEIGHTS", str(tmp_path / "empty-cache"))
    spec = parse_sweep({"name": "paper-k", "experiment": "ade20k/maps", "iterations": 4,
                        "space": {"MODEL.MAPS.NUM_RETRIEVED": {"type": "int", "low": 1, "high": 10}}})
    with pytest.raises(MissingWeights) as e:
        run_sweep(spec, trials=1, executor="debug", runs_root=tmp_path / "runs")
    assert [line.split()[1] for line in e.value.lines[:-1]] == ["r50-imagenet:", "clip-vit-b16-openai:"]
    assert not (tmp_path / "runs").exists()
    cfg, memory = trials_base(spec, allow_random_weights=True)
    assert cfg.MODEL.WEIGHTS == "" and memory["weights"] == ""
