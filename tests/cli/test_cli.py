"""The `maps` command: every command has --help, and user errors print one line."""
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from maps.cli import main
from maps.errors import MapsError


def _all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, prefix + (name,))


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Usage: main" in result.output or "Usage: maps" in result.output


@pytest.mark.parametrize("path", [p for p, _ in _all_commands(main)], ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_maps_error_is_one_line_without_traceback():
    @main.command("_boom_for_test")
    def _boom():
        raise MapsError("file x.json: key 'y' missing")

    try:
        result = CliRunner().invoke(main, ["_boom_for_test"])
    finally:
        main.commands.pop("_boom_for_test")
    assert result.exit_code == 2
    assert result.output.strip() == "error: file x.json: key 'y' missing"
    assert "Traceback" not in result.output


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "maps", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "maps" in out.stdout
