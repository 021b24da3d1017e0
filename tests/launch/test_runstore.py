"""The run store: layout, status transitions, metrics.json reading, ownership and claims."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

from maps.errors import MapsError
from maps.launch.runstore import RunStore, RunStoreError, read_metrics


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def test_run_dir_layout_and_root_from_env(tmp_path, monkeypatch, store):
    assert store.run_dir("ade20k/maps", 3) == tmp_path / "runs" / "ade20k" / "maps" / "seed3"
    monkeypatch.setenv("MAPS_RUNS", str(tmp_path / "elsewhere"))
    assert RunStore().root == tmp_path / "elsewhere"
    monkeypatch.delenv("MAPS_RUNS")
    assert str(RunStore().root) == "runs"


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "x/seed0", "trailing/"])
def test_bad_experiment_names_are_refused(store, name):
    with pytest.raises(RunStoreError, match="invalid experiment name"):
        store.run_dir(name, 0)


def test_bad_seed_is_refused(store):
    with pytest.raises(RunStoreError, match="seed must be a non-negative integer"):
        store.run_dir("exp", -1)


def test_transitions_stamp_times_and_merge_fields(store):
    run = store.run_dir("exp", 0)
    s = store.transition(run, "queued", executor="slurm", job_id="12_0")
    assert s["state"] == "queued" and s["experiment"] == "exp" and s["seed"] == 0
    assert s["attempt"] == 0 and "submitted_at" in s and s["job_id"] == "12_0"
    s = store.transition(run, "running", attempt=1)
    assert s["started_at"] and s["hostname"] and s["attempt"] == 1
    s = store.transition(run, "failed", error="boom", traceback="line")
    assert s["ended_at"] and s["error"] == "boom"
    # a new start clears the error of the previous attempt; None removes a field
    s = store.transition(run, "running", job_id=None)
    assert "error" not in s and "traceback" not in s and "job_id" not in s and "ended_at" not in s
    assert store.read_status(run) == s
    # written atomically: no temporary file left beside the record
    assert sorted(p.name for p in run.iterdir()) == ["status.json"]


def test_unknown_state_is_refused(store):
    with pytest.raises(RunStoreError, match="state must be one of"):
        store.transition(store.run_dir("exp", 0), "paused")


def test_directory_of_another_run_is_refused(store):
    run = store.run_dir("exp", 1)
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"experiment": "other", "seed": 1, "state": "done"}))
    with pytest.raises(RunStoreError, match=r"status.json: belongs to experiment 'other' seed 1, not 'exp' seed 1"):
        store.read_status(run)
    with pytest.raises(RunStoreError):
        store.transition(run, "queued")
    assert issubclass(RunStoreError, MapsError)


def test_corrupt_status_names_the_file(store):
    run = store.run_dir("exp", 0)
    run.mkdir(parents=True)
    (run / "status.json").write_text("{not json")
    with pytest.raises(RunStoreError, match=r"seed0/status.json: not valid JSON"):
        store.read_status(run)


def test_iter_runs_globs_experiment_names(store):
    for name, seed in [("ade20k/maps", 0), ("ade20k/maps", 1), ("ade20k/m2f", 0), ("coco/maps", 0)]:
        store.transition(store.run_dir(name, seed), "queued")
    store.run_dir("coco/never", 0).mkdir(parents=True)  # no status.json: not a run yet
    got = [(r.experiment, r.seed, r.state) for r in store.iter_runs("ade20k/*")]
    assert got == [("ade20k/m2f", 0, "queued"), ("ade20k/maps", 0, "queued"), ("ade20k/maps", 1, "queued")]
    assert [r.experiment for r in store.iter_runs("*/maps")] == ["ade20k/maps", "ade20k/maps", "coco/maps"]
    assert list(RunStore(store.root / "missing").iter_runs()) == []


def _lines(*records, tail=""):
    return "".join(json.dumps(r) + "\n" for r in records) + tail


def test_read_metrics_dedupes_resumed_iterations(tmp_path):
    # iterations 0..5 logged, checkpoint at 3, crash; the resumed run logs 4..7 again
    first = [{"iteration": i, "loss": 10.0 - i} for i in range(6)]
    second = [{"iteration": i, "loss": 100.0 - i} for i in range(4, 8)]
    (tmp_path / "metrics.json").write_text(_lines(*first, *second))
    got = read_metrics(tmp_path)
    assert [r["iteration"] for r in got] == list(range(8))
    assert [r["loss"] for r in got] == [10, 9, 8, 7, 96, 95, 94, 93]


def test_read_metrics_merges_eval_line_and_ignores_truncated_tail(tmp_path):
    text = _lines({"iteration": 9, "loss": 0.5}, {"iteration": 9, "PQ": 41.5},
                  tail='{"iteration": 10, "lo')
    (tmp_path / "metrics.json").write_text(text)
    assert read_metrics(tmp_path) == [{"iteration": 9, "loss": 0.5, "PQ": 41.5}]
    assert read_metrics(tmp_path / "nothing-here") == []


def test_read_metrics_bad_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.json").write_text('{"iteration": 0}\n{broken\n{"iteration": 1}\n')
    with pytest.raises(RunStoreError, match=r"metrics.json: line 2 is not valid JSON"):
        read_metrics(tmp_path)


_HOLD = textwrap.dedent("""
    import sys, time
    from maps.launch.runstore import RunStore
    with RunStore.claim(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_claim_is_exclusive_across_processes(store):
    run = store.run_dir("exp", 0)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunStoreError, match="still locked after 0.3s"):
            with store.claim(run, timeout_s=0.3):
                pass
        with store.claim(run, timeout_s=0.2, required=False) as locked:
            assert locked is False
        t0 = time.monotonic()
        with store.claim(run) as locked:  # blocks until the holder lets go
            assert locked is True
            assert holder.poll() is not None or time.monotonic() - t0 > 0.5
    finally:
        holder.wait(timeout=30)


def test_claim_is_reentrant_in_a_thread_and_exclusive_across_threads(store):
    """A nested claim of the same run (a signal handler's, say) holds at once; another thread
    of the same process waits like another process would. The lock file stays."""
    import threading

    run = store.run_dir("exp", 0)
    seen = {}

    def other_thread():
        with store.claim(run, timeout_s=0.2, required=False) as locked:
            seen["other"] = locked

    with store.claim(run) as outer:
        with store.claim(run, timeout_s=0.1) as inner:
            assert outer is True and inner is True
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen["other"] is False  # still held by this thread after the nested release
    assert (run / ".launch.lock").is_file()
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen["other"] is True
