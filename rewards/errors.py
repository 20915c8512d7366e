"""Errors of the rewards package. Messages are ONE line: they end up in training logs."""


class RewardError(Exception):
    """A reward could not be computed (a function raised, timed out or returned bad scores)."""


class RewardSpecError(RewardError):
    """A reward spec (registered name or `package.module:function`) cannot be resolved."""
