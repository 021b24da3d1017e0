"""The W&B writer, with real wandb in offline mode; what it logged is read back from the
offline run's record log (``run-<id>.wandb``), the file ``wandb sync`` would upload."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from detectron2.utils.events import EventStorage

from maps.engine.wandb_writer import (REACH_TIMEOUT_S, WandbWriter, has_wandb_credentials,
                                      offline_records, resolve_mode)


def read_wandb_records(run_dir, timeout=30.0):
    """Every Record of every offline run under run_dir/wandb, in file order.

    wandb-core writes the file in the background and may still be at it after ``finish()``
    returns: wait (bounded) until each run's file ends with its ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = [offline_records(p) for p in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))]
        if all(recs and recs[-1].WhichOneof("record_type") == "exit" for recs in records):
            return [r for recs in records for r in recs]
        if time.monotonic() > deadline:
            raise AssertionError(f"W&B offline files under {run_dir} still incomplete after {timeout}s")
        time.sleep(0.1)


def logged_steps(run_dir):
    """{step: {key: value}} of the history records (W&B's own ``_``-keys dropped)."""
    steps = {}
    for rec in read_wandb_records(run_dir):
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            steps.setdefault(rec.history.step.num, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return steps


def history_steps(run_dir):
    """Every history record's step, in the order they were logged (duplicates kept)."""
    return [r.history.step.num for r in read_wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]


def run_records(run_dir):
    return [r.run for r in read_wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    d = tmp_path / "runs" / "exp" / "seed0"
    d.mkdir(parents=True)
    return d


def train(writer, iters, period=3, start=0, eval_at=None):
    """Put a loss per iteration, write every ``period`` iterations as PeriodicWriter does."""
    with EventStorage(start) as storage:
        for it in range(start, iters):
            storage.iter = it
            storage.put_scalar("loss", 1.0 / (it + 1), smoothing_hint=False)
            if it == eval_at:
                storage.put_scalars(PQ=41.5, smoothing_hint=False)
            if (it + 1) % period == 0 or it == iters - 1:
                writer.write()


def test_steps_config_and_tags_are_logged(run_dir):
    w = WandbWriter(run_dir, "SOLVER:\n  BASE_LR: 0.0001\n", tags=["table:6", "seed:0"], project="maps-test")
    assert w.mode == "offline" and w.active
    train(w, 7, eval_at=6)
    w.close()
    steps = logged_steps(run_dir)
    assert sorted(steps) == [2, 5, 6] and history_steps(run_dir) == [2, 5, 6]
    assert steps[5]["loss"] == pytest.approx(1 / 6) and steps[6]["PQ"] == 41.5
    (run,) = run_records(run_dir)
    assert list(run.tags) == ["table:6", "seed:0"] and run.project == "maps-test"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["SOLVER"] == {"BASE_LR": 0.0001}
    record = json.loads((run_dir / "wandb.json").read_text())
    assert record["id"] == run.run_id and record["mode"] == "offline" and record["last_step"] == 6
    assert Path(record["offline_dir"]).is_dir()


def test_resume_keeps_the_id_and_never_relogs_a_step(run_dir):
    first = WandbWriter(run_dir, {"A": 1})
    train(first, 10)             # logs 2, 5, 8, 9
    first.close()
    run_id = first.run_id
    # an offline run's directory is named to the second: a restart is never that fast
    time.sleep(1.05 - time.time() % 1)
    # detectron2 resumes from its checkpoint at iteration 5 and replays 6..9 before going on
    second = WandbWriter(run_dir, {"A": 1})
    assert second.run_id == run_id
    train(second, 14, start=6)   # would log 8, 9 again (dropped), then 11, 13
    second.close()
    runs = run_records(run_dir)
    assert [r.run_id for r in runs] == [run_id, run_id]
    assert history_steps(run_dir) == [2, 5, 8, 9, 11, 13]
    assert json.loads((run_dir / "wandb.json").read_text())["last_step"] == 13


def test_api_key_is_never_written_to_run_records(run_dir, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)  # offline anyway: WANDB_MODE=offline
    w = WandbWriter(run_dir, "MODEL: {A: 1}\n")
    assert w.mode == "offline"
    train(w, 3)
    w.close()
    assert read_wandb_records(run_dir)  # waits until W&B has written everything
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_online_without_a_key_degrades_to_offline_with_one_warning(run_dir, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    w = WandbWriter(run_dir, {})
    assert w.mode == "offline" and w.active
    train(w, 3)
    w.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no API key is configured" in warnings[0].getMessage()
    assert sorted(logged_steps(run_dir)) == [2]


def test_failed_init_is_one_warning_and_a_no_op(run_dir, monkeypatch, caplog):
    import wandb

    real_init = wandb.init

    def broken_init(**kwargs):
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    w = WandbWriter(run_dir, {})
    assert not w.active
    train(w, 6)  # training goes on
    w.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "W&B init failed (CommError: network is unreachable)" in warnings[0]
    # the id was on disk before init was tried: the next attempt resumes the same run
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    monkeypatch.setattr(wandb, "init", real_init)
    again = WandbWriter(run_dir, {})
    assert again.active and again.run_id == run_id
    again.close()
    assert [r.run_id for r in run_records(run_dir)] == [run_id]


def test_a_run_that_raises_on_log_degrades_once(run_dir, caplog):
    w = WandbWriter(run_dir, {})
    calls = []

    def broken_log(data, step=None):
        calls.append(step)
        raise OSError("disk full")

    w._run.log = broken_log
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    train(w, 9)
    w.close()
    assert calls == [2] and not w.active
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "W&B log failed (OSError: disk full)" in warnings[0]


def test_mode_decision(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not has_wandb_credentials() and resolve_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert has_wandb_credentials() and resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode() == "offline"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"


def test_disabled_writer_touches_nothing(run_dir):
    w = WandbWriter(run_dir, {}, mode="disabled")
    assert not w.active
    train(w, 3)
    w.close()
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb.json").exists()


def test_default_tags_and_name_come_from_the_run_record(tmp_path, monkeypatch):
    from maps.launch.runstore import RunStore

    monkeypatch.setenv("WANDB_MODE", "offline")
    store = RunStore(tmp_path / "runs")
    run_dir = store.run_dir("synthetic/table6/clip-cls", 2)
    store.transition(run_dir, "running")
    w = WandbWriter(run_dir, {})
    w.close()
    (run,) = run_records(run_dir)
    tags = list(run.tags)
    assert tags[:3] == ["table:6", "exp:synthetic/table6/clip-cls", "seed:2"]
    assert all(t.startswith("git:") for t in tags[3:]) and len(tags) <= 4
    assert run.display_name == "synthetic/table6/clip-cls/seed2"
    # W&B's grouping and comparison views: the seeds of one experiment in one group
    assert run.run_group == "synthetic/table6/clip-cls" and run.job_type == "train"


def test_job_type_and_maps_facts_go_to_wandb(run_dir):
    facts = {"weights": [{"key": "MODEL.WEIGHTS", "name": "r50-imagenet", "sha256": "ab" * 32}],
             "random_weights": [], "overrides": {"SOLVER.BASE_LR": 0.001}}
    w = WandbWriter(run_dir, {"SOLVER": {"BASE_LR": 0.001}}, job_type="eval", extra_config=facts, group="g")
    w.close()
    (run,) = run_records(run_dir)
    assert run.job_type == "eval" and run.run_group == "g"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["maps"] == facts and config["SOLVER"] == {"BASE_LR": 0.001}


# -- an unreachable server, and resuming after a kill ---------------------------------------------
def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port  # nothing listens there now: a connection is refused at once


@pytest.fixture
def online(run_dir, monkeypatch):
    """What a user with an API key has: W&B online (the key is fake, the server on loopback)."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    return run_dir


@pytest.fixture
def silent_server():
    """A loopback socket that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def hanging_api():
    """An HTTP server on loopback that answers GET (reachable) but never answers W&B's API
    calls (POST), so ``wandb.init`` itself times out; each hang ends after 30 s at most."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_POST(self):
            stop.wait(30)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop.set()
    server.shutdown()
    server.server_close()


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "maps.engine.wandb_writer"]


def test_refused_connection_logs_offline_at_once_under_the_recorded_id(online, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    start = time.monotonic()
    w = WandbWriter(online, {})
    assert time.monotonic() - start < REACH_TIMEOUT_S
    assert w.mode == "offline" and w.active
    train(w, 3)
    w.close()
    (warning,) = _warnings(caplog)
    assert "is unreachable" in warning.getMessage() and "logging offline" in warning.getMessage()
    record = json.loads((online / "wandb.json").read_text())
    assert record["mode"] == "offline" and record["id"] == w.run_id
    assert [r.run_id for r in run_records(online)] == [w.run_id]
    assert sorted(logged_steps(online)) == [2]


def test_silent_server_costs_at_most_5_s_and_every_attempt_resumes_one_run(online, monkeypatch, caplog,
                                                                           silent_server):
    assert REACH_TIMEOUT_S <= 5
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    start = time.time()
    first = WandbWriter(online, {})
    (warning,) = _warnings(caplog)
    assert warning.created - start < REACH_TIMEOUT_S + 1.0  # the decision, not the offline init
    assert "no answer within 5 s" in warning.getMessage()
    assert first.mode == "offline" and first.active
    train(first, 10)                  # logs 2, 5, 8, 9
    first.close()
    time.sleep(1.05 - time.time() % 1)  # offline run directories are named to the second
    # the requeued attempt: the server now refuses at once; same run, history goes on
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")
    second = WandbWriter(online, {})
    assert second.run_id == first.run_id and second.mode == "offline"
    train(second, 14, start=6)
    second.close()
    assert [r.run_id for r in run_records(online)] == [first.run_id] * 2
    assert history_steps(online) == [2, 5, 8, 9, 11, 13]


def test_online_init_that_times_out_falls_back_offline_under_the_same_id(online, monkeypatch, caplog,
                                                                         hanging_api):
    monkeypatch.setenv("WANDB_BASE_URL", hanging_api)
    caplog.set_level(logging.WARNING, logger="maps.engine.wandb_writer")
    w = WandbWriter(online, {}, init_timeout_s=2)
    assert w.mode == "offline" and w.active
    (warning,) = _warnings(caplog)
    assert "W&B online init failed" in warning.getMessage() and w.run_id in warning.getMessage()
    train(w, 3)
    w.close()
    assert [r.run_id for r in run_records(online)] == [w.run_id]
    assert json.loads((online / "wandb.json").read_text())["id"] == w.run_id
    assert "f" * 40 not in (online / "wandb.json").read_text()


_KILLED_RUN = r"""
import sys
from detectron2.utils.events import EventStorage
from maps.engine.wandb_writer import WandbWriter

def train(writer, iters, start):
    with EventStorage(start) as storage:
        for it in range(start, iters):
            storage.iter = it
            storage.put_scalar("loss", 1.0 / (it + 1), smoothing_hint=False)
            if (it + 1) % 3 == 0 or it == iters - 1:
                writer.write()

w = WandbWriter(sys.argv[1], {})
train(w, 12, 0)                 # 2, 5, 8 stored by W&B; 11 is still an open history row
print(w.run_id, flush=True)
sys.stdin.readline()            # meanwhile the test freezes W&B's process
train(w, 20, 12)                # 14, 17, 19: logged, never stored
print("logged", flush=True)
sys.stdin.readline()            # killed here
"""


def _children(pid):
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _history(path):
    return [r.history.step.num for r in offline_records(path) if r.WhichOneof("record_type") == "history"]


def test_a_killed_run_resumes_without_gap_or_duplicate(run_dir):
    """W&B's process of a killed job had not stored its last steps: the record must not claim
    them (issue 16 item 10: resuming past them left holes in the history)."""
    # its own W&B process (WANDB_SERVICE would hand it this test process's one)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, "the training process did not start"
        (first,) = run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        deadline = time.monotonic() + 30
        while _history(first) != [2, 5, 8]:
            assert time.monotonic() < deadline, _history(first)
            time.sleep(0.1)
        cores = _children(proc.pid)
        assert cores, "no wandb-core process"
        for pid in cores:
            os.kill(pid, signal.SIGSTOP)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "logged"
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert _history(first) == [2, 5, 8]
    # the record claims no step that W&B did not store (the old writer said 19)
    assert json.loads((run_dir / "wandb.json").read_text())["last_step"] <= 8
    time.sleep(1.05 - time.time() % 1)
    # detectron2 resumes from its checkpoint at iteration 5
    second = WandbWriter(run_dir, {})
    assert second.run_id == run_id
    train(second, 22, start=6)
    second.close()
    later = [p for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) if p != first]
    assert len(later) == 1
    deadline = time.monotonic() + 30
    while [r.WhichOneof("record_type") for r in offline_records(later[0])][-1:] != ["exit"]:
        assert time.monotonic() < deadline, "W&B never finished the second attempt's file"
        time.sleep(0.1)
    # every write period once: 11 (logged but never stored) is logged again, 8 is not
    assert _history(first) + _history(later[0]) == [2, 5, 8, 11, 14, 17, 20, 21]
    assert json.loads((run_dir / "wandb.json").read_text())["last_step"] == 21
