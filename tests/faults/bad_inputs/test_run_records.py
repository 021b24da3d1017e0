"""Truncated, corrupt and mistyped run records: ``maps status`` lists every run, marks the
unreadable one ``corrupt`` naming its file, and exits non-zero; other commands refuse the
damaged record in one line. Nothing in the store is changed."""
from __future__ import annotations

import json

import pytest

from .harness import Case, check_refused, maps_env, params, run_record

MAPS = "synthetic/main/maps"


def _status(ws, text: bytes, name: str = "status.json", other: bool = True):
    if other:  # a healthy run beside the damaged one: it must still be listed
        run_record(ws, "synthetic/main/mask2former")
    run = run_record(ws, MAPS)
    (run / name).write_bytes(text)
    return ["status", "--runs-root", str(ws / "runs")]


def status_truncated(ws):
    return _status(ws, b'{"experiment": "synthetic/main/maps", "se')


def status_empty(ws):
    return _status(ws, b"")


def status_a_list(ws):
    return _status(ws, b'["done"]\n')


def status_not_utf8(ws):
    return _status(ws, b"\xff\xfe\x00garbage\x80")


def status_nul_bytes(ws):
    return _status(ws, b"\0" * 512)  # what a crash on some file systems leaves


def status_is_a_folder(ws):
    run_record(ws, "synthetic/main/mask2former")
    run = ws / "runs" / MAPS / "seed0"
    (run / "status.json").mkdir(parents=True)
    return ["status", "--runs-root", str(ws / "runs")]


def status_of_another_seed(ws):
    return _status(ws, json.dumps({"experiment": MAPS, "seed": 7, "state": "done"}).encode())


def status_seed_wrong_type(ws):
    return _status(ws, json.dumps({"experiment": MAPS, "seed": "zero", "state": "done"}).encode())


def status_json_of_selected_run(ws):
    _status(ws, b'{"state": ')
    return ["status", MAPS, "--runs-root", str(ws / "runs"), "--json"]


def final_truncated(ws):
    return _status(ws, b'{"PQ": 4', "final.json")


def final_a_number(ws):
    return _status(ws, b"42\n", "final.json")


def metrics_corrupt_line(ws):
    return _status(ws, b'{"iteration": 0, "loss": 1.0}\n{"iteration": 1, "lo\n{"iteration": 2}\n', "metrics.json")


def metrics_not_utf8(ws):
    return _status(ws, b"\x80\x81\x82\n{}\n", "metrics.json")


def wandb_truncated(ws):
    return _status(ws, b'{"id": "abc", "mode": "offl', "wandb.json")


def wandb_a_list(ws):
    return _status(ws, b"[]", "wandb.json")


def logs_of_a_corrupt_run(ws):
    _status(ws, b"{", other=False)
    return ["logs", f"{MAPS}/seed0", "--runs-root", str(ws / "runs")]


CASES = [
    Case("status.json truncated", status_truncated, "seed0/status.json: not valid JSON"),
    Case("status.json empty", status_empty, "seed0/status.json: not valid JSON"),
    Case("status.json a JSON list", status_a_list, "seed0/status.json: expected a JSON object"),
    Case("status.json not UTF-8", status_not_utf8, "seed0/status.json: not valid JSON"),
    Case("status.json of NUL bytes", status_nul_bytes, "seed0/status.json: not valid JSON"),
    Case("status.json is a folder", status_is_a_folder, "seed0/status.json: unreadable"),
    Case("status.json of another seed", status_of_another_seed, "seed0/status.json: belongs to experiment"),
    Case("status.json seed of the wrong type", status_seed_wrong_type, "seed0/status.json: belongs to experiment"),
    Case("status --json of a corrupt run", status_json_of_selected_run, "seed0/status.json: not valid JSON"),
    Case("final.json truncated", final_truncated, "seed0/final.json: not valid JSON"),
    Case("final.json a number", final_a_number, "seed0/final.json: expected a JSON object"),
    Case("metrics.json corrupt line", metrics_corrupt_line, "seed0/metrics.json: line 2 is not valid JSON"),
    Case("metrics.json not UTF-8", metrics_not_utf8, "seed0/metrics.json: not valid JSON lines"),
    Case("wandb.json truncated", wandb_truncated, "seed0/wandb.json: not valid JSON"),
    Case("wandb.json a list", wandb_a_list, "seed0/wandb.json: expected a JSON object"),
    Case("logs of a corrupt run", logs_of_a_corrupt_run, "seed0/status.json: not valid JSON"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_run_record_refusals(case, tmp_path):
    args = case.setup(tmp_path)
    message = check_refused(case, args, tmp_path, maps_env())
    if args[0] == "status" and "--json" not in args:
        assert message.startswith("error: 1 run record(s) unreadable")
