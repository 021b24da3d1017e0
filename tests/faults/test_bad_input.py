"""Bad input through the real ``maps`` command: one line naming the culprit, no traceback, no damage.

Each case prepares a workspace (a copy of a good thing, broken in one way), runs ``maps`` in a
subprocess and checks: exit status non-zero; stderr holds exactly one ``error: ...`` line (or
click's usage error) that names the file, key or value at fault; no ``Traceback``; every file
that existed before is byte-identical after, and nothing new appeared (the harness of
:mod:`tests.faults.bad_inputs.harness`, shared with the cases of that package). Cases that need
no detectron2 import run by default; those that do (datasets, banks, training) are ``slow``.

The table of docs/faults.md is this file's CASES, with the messages the command printed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, List

import pytest

from .bad_inputs.harness import Case, check_refused, params
from .conftest import REPO, TINY_CONFIG, maps_env

# -- registry and sweep spaces ------------------------------------------------------------------
def _registry(ws: Path, edit: Callable[[str], str], extra: str = "") -> Path:
    reg = ws / "registry"
    (reg / "configs").parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "experiments" / "configs", reg / "configs")
    text = (REPO / "experiments" / "synthetic" / "main.yaml").read_text()
    (reg / "main.yaml").write_text(edit(text))
    if extra:
        (reg / "extra.yaml").write_text(extra)
    return reg


def registry_not_yaml(ws):
    return ["list", "--registry", str(_registry(ws, lambda t: t, "table: 2\nentries: [\n"))]


def registry_unknown_key(ws):
    return ["list", "--registry", str(_registry(ws, lambda t: t.replace("iterations: 1000", "iterationz: 1000")))]


def registry_missing_base(ws):
    return ["list", "--registry", str(_registry(ws, lambda t: t.replace("base: synthetic/tiny.yaml",
                                                                        "base: synthetic/nope.yaml")))]


def registry_unknown_experiment(ws):
    return ["show", "synthetic/main/no-such-row", "--registry", str(REPO / "experiments")]


def _sweeps(ws: Path, edit: Callable[[str], str]) -> Path:
    d = ws / "sweeps"
    d.mkdir()
    (d / "s.yaml").write_text(edit((REPO / "sweeps" / "synthetic_retrieval.yaml").read_text()))
    return d


def sweep_unknown(ws):
    return ["sweep", "nosuch", "--best", "--runs-root", str(ws / "runs")]


def sweep_low_above_high(ws):
    d = _sweeps(ws, lambda t: t.replace("{type: int, low: 1, high: 8}", "{type: int, low: 9, high: 8}"))
    return ["sweep", str(d / "s.yaml"), "--best", "--runs-root", str(ws / "runs")]


def sweep_unknown_param_type(ws):
    d = _sweeps(ws, lambda t: t.replace("{type: float, low: 0.0, high: 1.0}", "{type: floaty, low: 0.0, high: 1.0}"))
    return ["sweep", str(d / "s.yaml"), "--best", "--runs-root", str(ws / "runs")]


# -- CLI values ---------------------------------------------------------------------------------
def cli_table_out_of_range(ws):
    return ["list", "--table", "9"]


def cli_trials_zero(ws):
    return ["sweep", "synthetic_retrieval", "--trials", "0", "--runs-root", str(ws / "runs")]


def cli_synth_zero_images(ws):
    return ["data", "synth", "--out", str(ws / "new"), "--train", "0"]


def cli_neighbors_k_zero(ws):
    return ["memory", "neighbors", "--bank", str(ws / "bank"), "--dataset", "synthetic_train",
            "--out", str(ws / "nb.jsonl"), "--k", "0"]


def cli_unknown_executor(ws):
    return ["launch", "synthetic/main/maps", "--executor", "kubernetes", "--runs-root", str(ws / "runs")]


def profile_unknown_key(ws):
    (ws / "p.yaml").write_text("partitionz: gpu\n")
    return ["launch", "synthetic/main/maps", "--executor", "local", "--profile", str(ws / "p.yaml"),
            "--dry-run", "--runs-root", str(ws / "runs")]


# -- run store --------------------------------------------------------------------------------
def _run(ws: Path, experiment: str, status_experiment: str) -> Path:
    run = ws / "runs" / experiment / "seed0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps(
        {"experiment": status_experiment, "seed": 0, "state": "done", "attempt": 1, "executor": "local"}) + "\n")
    (run / "final.json").write_text(json.dumps({"PQ": 1.0, "iteration": 1000}) + "\n")
    return run


def run_dir_of_another_experiment(ws):
    _run(ws, "synthetic/main/maps", "synthetic/main/mask2former")
    return ["launch", "synthetic/main/maps", "--seeds", "1", "--executor", "local", "--runs-root", str(ws / "runs")]


def corrupt_status_json(ws):
    run = _run(ws, "synthetic/main/maps", "synthetic/main/maps")
    (run / "status.json").write_text('{"experiment": "synthetic/main/maps", "se')
    return ["status", "--runs-root", str(ws / "runs")]


# -- datasets -------------------------------------------------------------------------------
def _dataset(ws: Path, datasets_root: Path) -> Path:
    ds = ws / "ds"
    shutil.copytree(datasets_root / "synthetic", ds)
    return ds


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def dataset_root_missing(ws, datasets_root):
    return ["data", "check", "synthetic_val", "--synthetic-root", str(ws / "nowhere")]


def panoptic_json_missing_field(ws, datasets_root):
    ds = _dataset(ws, datasets_root)
    _edit_json(ds / "panoptic_val.json", lambda d: d["annotations"][0].pop("segments_info"))
    return ["data", "check", "synthetic_val", "--synthetic-root", str(ds)]


def png_id_not_in_json(ws, datasets_root):
    ds = _dataset(ws, datasets_root)
    _edit_json(ds / "panoptic_val.json",
               lambda d: d["annotations"][0].update(segments_info=d["annotations"][0]["segments_info"][:-1]))
    return ["data", "check", "synthetic_val", "--synthetic-root", str(ds)]


def truncated_image(ws, datasets_root):
    ds = _dataset(ws, datasets_root)
    jpg = sorted((ds / "val").glob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 3])
    return ["data", "check", "synthetic_val", "--synthetic-root", str(ds)]


def eval_gt_missing_field(ws, datasets_root):
    ds = _dataset(ws, datasets_root)
    good = ws / "gt.json"
    shutil.copy(ds / "panoptic_val.json", good)
    _edit_json(ds / "panoptic_val.json", lambda d: d["annotations"][1].pop("segments_info"))
    return ["eval", "pq", "--gt-json", str(ds / "panoptic_val.json"), "--gt-dir", str(ds / "panoptic_val"),
            "--pred-json", str(good), "--pred-dir", str(ds / "panoptic_val")]


def eval_pred_png_id_not_in_json(ws, datasets_root):
    ds = _dataset(ws, datasets_root)
    pred = ws / "pred.json"
    shutil.copy(ds / "panoptic_val.json", pred)
    _edit_json(pred, lambda d: d["annotations"][0].update(segments_info=d["annotations"][0]["segments_info"][:-1]))
    return ["eval", "pq", "--gt-json", str(ds / "panoptic_val.json"), "--gt-dir", str(ds / "panoptic_val"),
            "--pred-json", str(pred), "--pred-dir", str(ds / "panoptic_val")]


def train_unknown_key(ws, datasets_root):
    return ["train", "--config", str(TINY_CONFIG), "--output", str(ws / "run"), "SOLVER.MAX_ITERR", "3"]


def train_bad_value(ws, datasets_root):
    return ["train", "--config", str(TINY_CONFIG), "--output", str(ws / "run"), "SOLVER.MAX_ITER", "abc"]


def train_missing_config(ws, datasets_root):
    return ["train", "--config", str(ws / "nope.yaml"), "--output", str(ws / "run")]


def _bank_copy(ws: Path, bank: Path) -> Path:
    dst = ws / "bank"
    shutil.copytree(bank, dst)
    return dst


def truncated_bank(ws, datasets_root, bank):
    b = _bank_copy(ws, bank)
    tokens = b / "object_tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:100])
    return ["memory", "info", "--bank", str(b)]


def bank_without_manifest(ws, datasets_root, bank):
    b = _bank_copy(ws, bank)
    (b / "manifest.json").unlink()  # what an interrupted build leaves
    return ["memory", "info", "--bank", str(b)]


def bank_of_another_encoder(ws, datasets_root, bank):
    # the bank's object tokens are CLIP-grid features; maps_tiny.yaml asks for TiledCLIP
    b = _bank_copy(ws, bank)
    shutil.copytree(bank.parent / "neighbors", ws / "neighbors")
    return ["train", "--config", str(TINY_CONFIG.with_name("maps_tiny.yaml")), "--output", str(ws / "run"),
            "SOLVER.MAX_ITER", "2", "MODEL.MAPS.MEMORY.BANK", str(b), "MODEL.MAPS.MEMORY.NEIGHBORS",
            str(ws / "neighbors")]


CASES: List[Case] = [
    Case("registry file is not YAML", registry_not_yaml, "extra.yaml: not valid YAML"),
    Case("registry entry with an unknown key", registry_unknown_key, "unknown key 'iterationz'"),
    Case("registry entry whose base config is missing", registry_missing_base, "synthetic/nope.yaml"),
    Case("unknown experiment name", registry_unknown_experiment, "synthetic/main/no-such-row"),
    Case("unknown sweep", sweep_unknown, "no sweep named 'nosuch'"),
    Case("CLI value out of range (--table 9)", cli_table_out_of_range, "'--table': 9"),
    Case("CLI value out of range (--trials 0)", cli_trials_zero, "'--trials': 0"),
    Case("CLI value out of range (--train 0)", cli_synth_zero_images, "'--train': 0"),
    Case("CLI value out of range (--k 0)", cli_neighbors_k_zero, "'--k': 0"),
    Case("CLI value not a choice (--executor)", cli_unknown_executor, "'kubernetes'"),
    Case("cluster profile with an unknown key", profile_unknown_key, "unknown key 'partitionz'"),
    # the launcher's claim (flock) leaves its lock file in the existing run folder
    Case("run directory of another experiment", run_dir_of_another_experiment,
         "belongs to experiment 'synthetic/main/mask2former'", outputs=["runs/synthetic/main/maps/seed0/.launch.lock"]),
    Case("corrupt status.json", corrupt_status_json, "status.json: not valid JSON"),
    Case("sweep space with low > high", sweep_low_above_high, "MODEL.MAPS.NUM_RETRIEVED"),
    Case("sweep space with an unknown type", sweep_unknown_param_type, "floaty"),
]
DATA_CASES: List[Case] = [
    Case("missing dataset root", dataset_root_missing, "nowhere/panoptic_val.json"),
    Case("panoptic JSON annotation without segments_info", panoptic_json_missing_field, "segments_info"),
    Case("PNG segment id not in the JSON", png_id_not_in_json, "000010000001.png"),
    Case("truncated JPEG", truncated_image, "000010000001.jpg: unreadable or truncated image"),
    Case("maps eval pq: ground truth without segments_info", eval_gt_missing_field, "annotation #1 lacks"),
    Case("maps eval pq: predicted PNG id not in the JSON", eval_pred_png_id_not_in_json,
         "not in its segments_info"),
    Case("maps train: unknown config key", train_unknown_key, "SOLVER.MAX_ITERR"),
    Case("maps train: value of the wrong type", train_bad_value, "SOLVER.MAX_ITER"),
    Case("maps train: config file missing", train_missing_config, "nope.yaml"),
]
BANK_CASES: List[Case] = [
    Case("truncated bank array", truncated_bank, "object_tokens.npy is unreadable or truncated"),
    Case("bank directory without manifest (interrupted build)", bank_without_manifest, "manifest.json is missing"),
    # the bank reader keeps its verification stamp in the bank (maps.memory): not a damage
    Case("bank built with another encoder", bank_of_another_encoder, "MODEL.MAPS.MEMORY.DENSE is 'tiledclip'",
         outputs=["bank/.verified.json"]),
]

for _case in DATA_CASES + BANK_CASES:  # these import detectron2 in the subprocess
    _case.slow = True


@pytest.mark.parametrize("case", params(CASES))
def test_registry_cli_and_store_refusals(case, tmp_path):
    args = case.setup(tmp_path)
    check_refused(case, args, tmp_path, maps_env())


@pytest.mark.parametrize("case", params(DATA_CASES))
def test_dataset_eval_and_train_refusals(case, tmp_path, datasets_root):
    args = case.setup(tmp_path, datasets_root)
    check_refused(case, args, tmp_path, maps_env(datasets_root))


@pytest.mark.parametrize("case", params(BANK_CASES))
def test_memory_bank_refusals(case, tmp_path, datasets_root, bank):
    args = case.setup(tmp_path, datasets_root, bank)
    check_refused(case, args, tmp_path, maps_env(datasets_root))
