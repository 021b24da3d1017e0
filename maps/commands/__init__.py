"""CLI command modules; each exports ``COMMANDS`` (see :mod:`maps.cli`)."""
