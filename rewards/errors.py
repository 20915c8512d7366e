"""Errors of the rewards package. Messages are ONE line: they end up in training logs."""


class RewardError(Exception):
    """A reward could not be computed (a function raised, timed out or returned bad scores)."""


class RewardSetupError(RewardError):
    """A reward cannot run here at all (its infrastructure, e.g. the code sandbox's isolation), so
    no sample can be scored: RewardSet raises it whatever `on_error` says, never a per-sample 0."""


class RewardSpecError(RewardError):
    """A reward spec (registered name or `package.module:function`) cannot be resolved."""


def short_repr(e: BaseException, limit: int = 160) -> str:
    """`Type: message` of an exception on one bounded line, for one-line error messages."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
