"""Errors caused by the user's input (config, data), as opposed to bugs.

The CLI catches `UserError`, prints its one-line message and exits with status 2,
so the message must name the problem precisely (file, field, line or row).
"""


class UserError(Exception):
    """Bad input from the user: one line, says what and where."""


class DataError(UserError):
    """A data file or data source is malformed (missing column, empty file, bad JSON line...)."""
