"""Checkpoint evaluation: MT-Bench (FastChat protocol) and AlpacaEval 2.0 (alpaca_eval metrics) with pluggable judges.

The judges are loaded on first use (`align.eval.OpenAIJudge`), so importing the eval configs stays cheap.
"""

from align.eval.errors import EvalError, JudgeAPIError
from align.eval.types import ChatModel

_JUDGES = ("Judge", "JudgeRequest", "LocalModelJudge", "OpenAIJudge", "RewardModelJudge")
__all__ = ["ChatModel", "EvalError", "JudgeAPIError", *_JUDGES]


def __getattr__(name: str):
    if name in _JUDGES:
        from align.eval import judges

        return getattr(judges, name)
    raise AttributeError(f"module 'align.eval' has no attribute {name!r}")
