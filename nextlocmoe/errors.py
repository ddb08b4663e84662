"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class NextLocMoEError(Exception):
    """Base class: the message names the file, column or parameter and what was expected."""


class DataError(NextLocMoEError):
    """A data file is missing, malformed, or empty after filtering."""


class ConfigError(NextLocMoEError):
    """A configuration value is unknown or out of range."""


class OutputError(NextLocMoEError):
    """A file or directory cannot be written: permission, read-only file system, no space left, ..."""
