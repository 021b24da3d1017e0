"""Whatever goes wrong in a command ends as one ``error:`` line (issue 12): an OSError names
the path, a bug says how to see its traceback, ``--debug`` / ``MAPS_DEBUG=1`` show it, and
no password of a URL is ever printed."""
import errno

import click
import pytest
from click.testing import CliRunner

from maps.cli import main
from maps.errors import MapsError


@pytest.fixture
def command():
    """Register a throwaway command raising what the test sets; removed afterwards."""
    box = {}

    @main.command("_raise_for_test")
    def _raise():
        raise box["error"]

    yield box
    main.commands.pop("_raise_for_test")


def _run(args, env=None):
    return CliRunner().invoke(main, args, env=env or {"MAPS_DEBUG": ""})


def test_os_error_is_one_line_naming_the_path(command):
    command["error"] = NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file.txt/out")
    result = _run(["_raise_for_test"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: /data/file.txt/out: Not a directory"
    assert "Traceback" not in result.output


def test_rename_error_names_both_paths(command):
    command["error"] = OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")
    assert _run(["_raise_for_test"]).stderr.strip() == "error: /a -> /b: Invalid cross-device link"


def test_disk_full_without_a_path_is_one_line(command):
    command["error"] = OSError(errno.ENOSPC, "No space left on device")
    result = _run(["_raise_for_test"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: No space left on device"


def test_a_bug_is_one_line_with_the_hint(command):
    command["error"] = ZeroDivisionError("division by zero")
    result = _run(["_raise_for_test"])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: ZeroDivisionError: division by zero "
                                     "(run with --debug for the traceback)")


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_prints_the_traceback_then_the_line(command, how):
    command["error"] = KeyError("x")
    args, env = (["--debug", "_raise_for_test"], {"MAPS_DEBUG": ""}) if how == "option" else (
        ["_raise_for_test"], {"MAPS_DEBUG": "1"})
    result = _run(args, env)
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.strip().splitlines()[-1].startswith("error: KeyError: 'x'")


def test_no_password_in_the_line_or_the_traceback(command):
    command["error"] = MapsError("--storage postgresql://u:s3cr3t-pw@127.0.0.1:1/db: refused")
    for args in (["_raise_for_test"], ["--debug", "_raise_for_test"]):
        result = _run(args)
        assert result.exit_code == 2
        assert "s3cr3t-pw" not in result.output
        assert "postgresql://u:***@127.0.0.1:1/db: refused" in result.stderr


def test_click_usage_errors_and_exits_pass_through(command):
    command["error"] = click.exceptions.Exit(3)
    assert _run(["_raise_for_test"]).exit_code == 3
    assert _run(["no-such-command"]).exit_code == 2
