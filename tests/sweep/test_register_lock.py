"""Two ``maps sweep --register`` at once on one registry file: both entries are kept (issue 12).

Without a lock, both read the file, each appends its entry, and the second rename drops the
first entry. ``_append_entry`` is slowed down here so that the two always overlap.
"""
from __future__ import annotations

import threading
import time

import maps.sweep.report as report
from maps.registry import load_registry
from maps.sweep import parse_sweep
from maps.sweep.report import BestTrial, register_best

from .conftest import toy_sweep


def test_concurrent_registrations_keep_both_entries(experiments_copy, monkeypatch):
    spec = parse_sweep(toy_sweep())
    best = BestTrial(3, {"MODEL.MAPS.NUM_RETRIEVED": 4, "MODEL.MAPS.INPUT_MASKING_PROB": 0.5,
                         "MODEL.MAPS.SCENE_LAYERS": [0, 1]}, {"PQ": 50.0}, {"PQ": 50.0}, None)
    real = report._append_entry

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(0.5)  # between reading the file and writing it back
        return out

    monkeypatch.setattr(report, "_append_entry", slow)
    errors = []

    def register(name):
        try:
            register_best(spec, best, name, experiments_root=experiments_copy)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(f"synthetic/sweeps/toy-{i}",)) for i in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    registry = load_registry(experiments_copy)
    assert "synthetic/sweeps/toy-a" in registry and "synthetic/sweeps/toy-b" in registry
