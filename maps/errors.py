"""Errors a user can fix: the CLI prints them as one line, without a traceback."""


class MapsError(Exception):
    """Base of every error caused by user input (a file, key or value at fault)."""


class ConfigError(MapsError):
    """A config file, key or value is invalid."""


class DatasetError(MapsError):
    """A dataset is missing or malformed; the message names the file and what was expected."""


class MemoryBankError(MapsError):
    """A memory bank is missing, truncated, inconsistent or built with another encoder."""
