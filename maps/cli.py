"""The ``maps`` command: a thin layer of parsing and printing over the library.

Each module of :mod:`maps.commands` declares ``COMMANDS`` (click commands or groups) and
keeps its heavy imports (torch, detectron2) inside the command bodies, so that
``maps --help`` stays fast. Whatever goes wrong ends as one ``error: ...`` line on stderr,
without a traceback: a :class:`maps.errors.MapsError` (bad input: a file, key or value at
fault) exits 2; an ``OSError`` (a path under a file, an unwritable folder, a full disk) names
the path and exits 1; any other exception (a bug) is one line with a hint and exits 1. The
full traceback is printed only with ``maps --debug ...`` or ``MAPS_DEBUG=1``.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import click

from maps import __version__
from maps.errors import MapsError, redact_secrets


DEBUG_HINT = "(run with --debug for the traceback)"


def _one_line(text: str) -> str:
    # one line, whatever the message quotes (a YAML parser's multi-line report, say), and no
    # password of a URL it quotes (a storage URL): terminals and job logs are shared
    return redact_secrets(" ".join(str(text).split()))


def os_error_message(e: OSError) -> str:
    """``<path>: <reason>`` (``<path> -> <path2>`` for a rename), or the reason alone."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return reason
    where = os.fsdecode(e.filename)
    if isinstance(e, FileExistsError) and os.path.isfile(where):  # mkdir where a file is
        reason += " (a file, where a folder is needed)"
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    return f"{where}: {reason}"


class _MapsGroup(click.Group):
    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug")) or os.environ.get("MAPS_DEBUG", "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors, --help, Ctrl-C
        except MapsError as e:
            _fail("error: " + _one_line(e), 2, debug)
        except OSError as e:
            _fail("error: " + _one_line(os_error_message(e)), 1, debug)
        except Exception as e:  # a bug: one line here, the traceback with --debug
            _fail(f"error: {type(e).__name__}: {_one_line(e)} {DEBUG_HINT}", 1, debug)


def _close_progress_bars() -> None:
    """End the progress bars a failure interrupted, so that the error starts its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # a bar is cosmetic: never hide the error behind it
            pass


def _fail(line: str, status: int, debug: bool) -> None:
    """Print the error (with ``debug``, the traceback first, passwords of URLs masked), exit."""
    _close_progress_bars()
    if debug:
        import traceback

        click.echo(redact_secrets(traceback.format_exc()).rstrip(), err=True)
    click.echo(line, err=True)
    sys.exit(status)


@click.group(cls=_MapsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maps")
@click.option("--debug", is_flag=True, help="Print the full traceback of an error (also: MAPS_DEBUG=1).")
def main(debug: bool) -> None:
    """MAPS (Memory Augmented Panoptic Segmentation): reproduce, ablate and tune the paper."""


def _register_commands() -> None:
    import maps.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register_commands()
