"""Wrong types, values with newlines, unknown keys, tasks from files, passwords in URLs, and
configs refused before ``maps train`` writes anything (issue 12)."""
from __future__ import annotations

import pytest

from .harness import (REPO, SECRET, Case, check_refused, launch_dry_run, maps_env, params, profile,
                      registry_copy, replace_once, sweep_copy)

TINY = REPO / "experiments" / "configs" / "synthetic" / "tiny.yaml"
STORAGE = f"postgresql://maps:{SECRET}@127.0.0.1:1/maps"


# -- wrong types ---------------------------------------------------------------------------------
def registry_iterations_text(ws):
    return ["list", "--registry", str(registry_copy(ws, lambda t: replace_once(t, "iterations: 1000", "iterations: many")))]


def registry_seeds_text(ws):
    return ["list", "--registry", str(registry_copy(ws, lambda t: replace_once(t, "seeds: 3", "seeds: three")))]


def registry_entries_a_mapping(ws):
    return ["list", "--registry", str(registry_copy(ws, extra="table: 2\nsuite: synthetic\nentries: {a: 1}\n"))]


def registry_table_a_list(ws):
    return ["list", "--registry", str(registry_copy(ws, extra="table: [2]\nsuite: synthetic\nentries: []\n"))]


def sweep_low_text(ws):
    s = sweep_copy(ws, lambda t: replace_once(t, "{type: int, low: 1, high: 8}", "{type: int, low: one, high: 8}"))
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


def sweep_space_a_list(ws):
    s = sweep_copy(ws, lambda t: t.split("space:")[0] + "space: [a, b]\nheartbeat: {interval: 5, grace: 60}\n")
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


def profile_gpus_text(ws):
    return launch_dry_run(ws, profile(ws, "gpus_per_node: two\n"))


def profile_negative_time(ws):
    return launch_dry_run(ws, profile(ws, "timeout_min: -5\n"))


def profile_not_a_mapping(ws):
    return launch_dry_run(ws, profile(ws, "- partition\n- gpu\n"))


# -- values with newlines (an sbatch script is made of lines) ------------------------------------
def profile_partition_newline(ws):
    return launch_dry_run(ws, profile(ws, 'partition: "gpu\\n#SBATCH --uid=0"\n'))


def profile_account_newline(ws):
    return launch_dry_run(ws, profile(ws, "account: |\n  mine\n  #SBATCH --exclusive\n"))


def profile_setup_newline(ws):
    return launch_dry_run(ws, profile(ws, 'setup:\n  - "module load cuda\\nrm -rf ~"\n'))


def registry_name_newline(ws):
    reg = registry_copy(ws, lambda t: replace_once(t, "  - name: synthetic/main/maps\n",
                                                   '  - name: "synthetic/main/maps\\nx"\n'))
    return ["list", "--registry", str(reg)]


def launch_selector_newline(ws):
    return ["launch", "synthetic/main/nope\nrm -rf /", "--executor", "local", "--dry-run",
            "--runs-root", str(ws / "runs")]


def sweep_name_newline(ws):
    s = sweep_copy(ws, lambda t: t + 'name: "retrieval\\n#"\n')
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


# -- unknown keys --------------------------------------------------------------------------------
def registry_unknown_file_key(ws):
    return ["list", "--registry", str(registry_copy(ws, lambda t: replace_once(t, "title:", "titel: x\ntitle:")))]


def registry_unknown_default_key(ws):
    return ["list", "--registry", str(registry_copy(ws, lambda t: replace_once(t, "  seeds: 3", "  seedz: 3")))]


def sweep_unknown_top_key(ws):
    s = sweep_copy(ws, lambda t: t + "trails: 5\n")
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


def sweep_unknown_param_key(ws):
    s = sweep_copy(ws, lambda t: replace_once(t, "{type: int, low: 1, high: 8}", "{type: int, low: 1, high: 8, stepp: 2}"))
    return ["sweep", str(s), "--best", "--runs-root", str(ws / "runs")]


def sweep_unknown_config_key(ws):
    s = sweep_copy(ws, lambda t: replace_once(t, "MODEL.MAPS.NUM_RETRIEVED:", "MODEL.MAPS.NUM_RETRIEVD:"))
    return ["sweep", str(s), "--trials", "1", "--executor", "debug", "--runs-root", str(ws / "runs")]


def profile_unknown_nested_key(ws):
    return launch_dry_run(ws, profile(ws, "additional_parameters: 5\n"))


# -- a task named by a file may only be one of maps' own -----------------------------------------
def sweep_task_os_system(ws):
    s = sweep_copy(ws, lambda t: t + 'task: "os:system"\n')
    return ["sweep", str(s), "--trials", "1", "--executor", "debug", "--runs-root", str(ws / "runs")]


def sweep_task_other_module(ws):
    s = sweep_copy(ws, lambda t: t + 'task: "shutil:rmtree"\n')
    return ["sweep", str(s), "--trials", "1", "--executor", "debug", "--runs-root", str(ws / "runs")]


# -- passwords in URLs are never printed -----------------------------------------------------------
def sweep_best_postgres_password(ws):
    return ["sweep", "synthetic_retrieval", "--best", "--storage", STORAGE, "--runs-root", str(ws / "runs")]


def sweep_run_postgres_password(ws):
    return ["sweep", "synthetic_retrieval", "--trials", "1", "--executor", "debug", "--storage", STORAGE,
            "--runs-root", str(ws / "runs")]


def sweep_mysql_password(ws):
    return ["sweep", "synthetic_retrieval", "--best", "--storage", f"mysql+pymysql://root:{SECRET}@localhost/x",
            "--runs-root", str(ws / "runs")]


def sweep_report_password(ws):
    return ["sweep", "synthetic_retrieval", "--report", "--out", str(ws / "report"), "--storage", STORAGE,
            "--runs-root", str(ws / "runs")]


def sweep_password_in_the_environment(ws):
    return ["sweep", "synthetic_retrieval", "--best", "--runs-root", str(ws / "runs")]


def sweep_storage_unknown_scheme_password(ws):
    return ["sweep", "synthetic_retrieval", "--best", "--storage", f"redis://:{SECRET}@127.0.0.1:1/0",
            "--runs-root", str(ws / "runs")]


# -- maps train validates the whole config before it writes anything -------------------------------
def _train(ws, *opts, config=TINY, resume=False):
    return ["train", "--config", str(config), "--output", str(ws / "run"), *(["--resume"] if resume else []),
            "--allow-random-weights", *opts]


def train_max_iter_zero(ws, datasets_root):
    return _train(ws, "SOLVER.MAX_ITER", "0")


def train_probability_above_one(ws, datasets_root):
    return _train(ws, "MODEL.MAPS.INPUT_MASKING_PROB", "2.0")


def train_layer_outside_decoder(ws, datasets_root):
    return _train(ws, "MODEL.MAPS.SCENE_LAYERS", "[0, 42]")


def train_step_at_max_iter(ws, datasets_root):
    return _train(ws, "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(10,)")


def train_unregistered_dataset(ws, datasets_root):
    return _train(ws, "DATASETS.TRAIN", "('coco_2017_nowhere',)")


def train_stale_last_checkpoint(ws, datasets_root):
    run = ws / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_0000099.pth")  # its checkpoint was deleted
    (run / "metrics.json").write_text('{"iteration": 98}\n')
    return _train(ws, "SOLVER.MAX_ITER", "3", resume=True)


def train_unknown_scheduler(ws, datasets_root):
    return _train(ws, "SOLVER.LR_SCHEDULER_NAME", "WarmupFancyLR")


def train_odd_overrides(ws, datasets_root):
    return _train(ws, "SOLVER.MAX_ITER")


CASES = [
    Case("registry: iterations not a number", registry_iterations_text, "iterations"),
    Case("registry: seeds not a number", registry_seeds_text, "seeds"),
    Case("registry: entries a mapping", registry_entries_a_mapping, "entries"),
    Case("registry: table a list", registry_table_a_list, "table"),
    Case("sweep: low not a number", sweep_low_text, "MODEL.MAPS.NUM_RETRIEVED"),
    Case("sweep: space a list", sweep_space_a_list, "space"),
    Case("profile: gpus_per_node not a number", profile_gpus_text, "gpus_per_node"),
    Case("profile: negative timeout", profile_negative_time, "timeout_min"),
    Case("profile: not a mapping", profile_not_a_mapping, "p.yaml"),
    Case("profile: partition with a newline", profile_partition_newline, "partition"),
    Case("profile: account with a newline", profile_account_newline, "account"),
    Case("profile: setup line with a newline", profile_setup_newline, "setup"),
    Case("registry: entry name with a newline", registry_name_newline, "synthetic/main/maps"),
    Case("launch: selector with a newline", launch_selector_newline, "synthetic/main/nope rm -rf /"),
    Case("sweep: name with a newline", sweep_name_newline, "name"),
    Case("registry: unknown file key", registry_unknown_file_key, "titel"),
    Case("registry: unknown defaults key", registry_unknown_default_key, "seedz"),
    Case("sweep: unknown top-level key", sweep_unknown_top_key, "trails"),
    Case("sweep: unknown key of a parameter", sweep_unknown_param_key, "stepp"),
    Case("sweep: unknown config key", sweep_unknown_config_key, "MODEL.MAPS.NUM_RETRIEVD", slow=True),
    Case("profile: additional_parameters not a mapping", profile_unknown_nested_key, "additional_parameters"),
    Case("sweep: task os:system", sweep_task_os_system, "key 'task'"),
    Case("sweep: task of another module", sweep_task_other_module, "key 'task'"),
    Case("sweep --best: password in a postgresql URL", sweep_best_postgres_password, "postgresql://maps:***@"),
    Case("sweep: password in a postgresql URL", sweep_run_postgres_password, "postgresql://maps:***@"),
    Case("sweep --best: password in a mysql URL", sweep_mysql_password, "mysql+pymysql://root:***@"),
    Case("sweep --report: password in the URL", sweep_report_password, "postgresql://maps:***@"),
    Case("sweep: password in a URL of an unknown scheme", sweep_storage_unknown_scheme_password, "redis://:***@"),
    Case("sweep: password in MAPS_OPTUNA_STORAGE", sweep_password_in_the_environment, "postgresql://maps:***@",
         env={"MAPS_OPTUNA_STORAGE": STORAGE}),
]
TRAIN_CASES = [
    Case("train: SOLVER.MAX_ITER 0", train_max_iter_zero, "SOLVER.MAX_ITER: must be >= 1, got 0", slow=True),
    Case("train: masking probability 2.0", train_probability_above_one, "MODEL.MAPS.INPUT_MASKING_PROB", slow=True),
    Case("train: memory layer outside the decoder", train_layer_outside_decoder, "MODEL.MAPS.SCENE_LAYERS", slow=True),
    Case("train: LR drop at MAX_ITER", train_step_at_max_iter, "SOLVER.STEPS", slow=True),
    Case("train: unregistered dataset", train_unregistered_dataset, "coco_2017_nowhere", slow=True),
    Case("train --resume: stale last_checkpoint", train_stale_last_checkpoint, "last_checkpoint", slow=True),
    Case("train: unknown LR scheduler", train_unknown_scheduler, "WarmupFancyLR", slow=True),
    Case("train: override without a value", train_odd_overrides, "KEY VALUE pairs", slow=True),
]


@pytest.mark.parametrize("case", params(CASES))
def test_value_refusals(case, tmp_path):
    args = case.setup(tmp_path)
    check_refused(case, args, tmp_path, maps_env())


@pytest.mark.parametrize("case", params(TRAIN_CASES))
def test_train_validates_before_writing(case, tmp_path, datasets_root):
    args = case.setup(tmp_path, datasets_root)
    check_refused(case, args, tmp_path, maps_env(datasets_root))
    assert not (tmp_path / "run" / "config.yaml").exists()
