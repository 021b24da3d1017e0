"""A storage URL's password is never shown, logged nor pickled into a worker's job.

No database server runs here, so no storage checks a password. The end-to-end test uses a
real storage whose URL carries one all the same: SQLite in URI mode takes a ``password=``
query parameter and ignores it (psycopg reads the same parameter as the password of a
PostgreSQL URL, so masking it is no toy). ``user:password@`` URLs are checked by the masking
function and against a PostgreSQL URL that cannot open (no driver here, and no server on the
port): the error is one line, the password masked.
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import yaml
from click.testing import CliRunner

from maps.sweep import SweepError, open_study, parse_sweep, run_sweep, study_dir
from maps.sweep.study import STORAGE_ENV, mask_url, scrub, worker_storage_url

from .conftest import toy_sweep

SECRET = "hunter2-s3cr3t"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("url, shown", [
    ("postgresql://maps:hunter2@db.example:5432/optuna", "postgresql://maps:***@db.example:5432/optuna"),
    ("postgresql+psycopg2://maps:p@ss@db/optuna", "postgresql+psycopg2://maps:***@db/optuna"),
    ("mysql://:pw@db/optuna", "mysql://:***@db/optuna"),
    ("postgresql://maps@db/optuna?sslmode=require&password=hunter2",
     "postgresql://maps@db/optuna?sslmode=require&password=***"),
    ("postgresql://maps@db/optuna", "postgresql://maps@db/optuna"),
    ("sqlite:////shared/optuna.db", "sqlite:////shared/optuna.db"),
    ("journal:/runs/sweep/toy/journal.log", "journal:/runs/sweep/toy/journal.log"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown
    assert mask_url(shown) == shown


def test_scrub_hides_the_password_in_free_text():
    url = "postgresql://maps:p%40ssw0rd@db/optuna"
    text = f"could not connect to {url} as maps with password p@ssw0rd"
    assert scrub(text, url) == "could not connect to postgresql://maps:***@db/optuna as maps with password ***"


def test_worker_takes_the_password_from_its_environment_only(monkeypatch):
    url = f"postgresql://maps:{SECRET}@db/optuna"
    shown = mask_url(url)
    assert worker_storage_url("journal:/runs/j.log") == "journal:/runs/j.log"
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    with pytest.raises(SweepError, match=f"password is not in this worker's environment .{STORAGE_ENV} is unset"):
        worker_storage_url(shown)
    monkeypatch.setenv(STORAGE_ENV, "postgresql://maps:other@elsewhere/optuna")
    with pytest.raises(SweepError, match="is another URL"):
        worker_storage_url(shown)
    monkeypatch.setenv(STORAGE_ENV, url)
    assert worker_storage_url(shown) == url


def test_local_workers_get_the_password_through_the_environment_not_the_pickle(runs_root, tmp_path,
                                                                               monkeypatch, caplog):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    url = f"sqlite:///file:{tmp_path}/toy.db?mode=rwc&password={SECRET}&uri=true"
    spec = parse_sweep(toy_sweep())
    result = run_sweep(spec, trials=2, executor="local", storage=url, runs_root=runs_root)
    assert result.worker_errors == [] and result.counts == {"COMPLETE": 2}
    assert result.storage == mask_url(url) and "password=***" in result.storage
    assert STORAGE_ENV not in os.environ  # set for the workers only while they ran
    assert len(open_study(spec, url).trials) == 2
    pickles = list((study_dir(runs_root, "toy") / "workers").rglob("*.pkl"))
    assert pickles, "no submitit job pickles"
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.name.startswith("toy.db"):
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text


def test_unreachable_rdb_is_one_fast_line_with_the_password_masked(runs_root, tmp_path, monkeypatch):
    url = f"postgresql://maps:{SECRET}@127.0.0.1:{_free_port()}/optuna"
    spec = parse_sweep(toy_sweep())
    start = time.monotonic()
    with pytest.raises(SweepError) as e:
        run_sweep(spec, trials=1, executor="debug", storage=url, runs_root=runs_root)
    assert time.monotonic() - start < 30
    message = str(e.value)
    assert "\n" not in message and SECRET not in message
    assert message.startswith(f"--storage postgresql://maps:***@127.0.0.1:")
    # the command line says the same, from --storage or from the environment
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "toy.yaml").write_text(yaml.safe_dump(toy_sweep()))
    monkeypatch.setenv("MAPS_SWEEPS", str(sweeps))
    from maps.cli import main

    args = ["sweep", "toy", "--trials", "1", "--executor", "debug", "--runs-root", str(runs_root)]
    for extra, env in ((["--storage", url], {}), ([], {STORAGE_ENV: url})):
        out = CliRunner().invoke(main, args + extra, env=env)
        assert out.exit_code != 0 and SECRET not in out.output, out.output
        assert "postgresql://maps:***@127.0.0.1:" in out.output, out.output
    # a journal storage is shown as it is
    out = CliRunner().invoke(main, args + ["--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["storage"].startswith("journal:")
