"""The ``maps`` command: a thin layer of parsing and printing over the library.

Each module of :mod:`maps.commands` declares ``COMMANDS`` (click commands or groups) and
keeps its heavy imports (torch, detectron2) inside the command bodies, so that
``maps --help`` stays fast. A :class:`maps.errors.MapsError` raised by any command becomes a
one-line message and exit status 2, without a traceback.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

import click

from maps import __version__
from maps.errors import MapsError


# fvcore (via detectron2) scripts a function at import; torch 2.14 deprecates that loudly
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)


class _MapsGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MapsError as e:
            # one line, whatever the message quotes (a YAML parser's multi-line report, say)
            click.echo("error: " + " ".join(str(e).split()), err=True)
            sys.exit(2)


@click.group(cls=_MapsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maps")
def main() -> None:
    """MAPS (Memory Augmented Panoptic Segmentation): reproduce, ablate and tune the paper."""


def _register_commands() -> None:
    import maps.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register_commands()
