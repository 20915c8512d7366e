"""Evaluation errors: bad eval inputs (data files, config, judge endpoint) surface as one-line `UserError`s."""

from align.errors import UserError


class EvalError(UserError):
    """An evaluation input is unusable (missing file, malformed row, unreachable judge, ...)."""


class JudgeAPIError(EvalError):
    """The judge endpoint kept failing after all retries (or rejected the request outright)."""
