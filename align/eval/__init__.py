"""Checkpoint evaluation: MT-Bench (FastChat protocol) and AlpacaEval 2.0 (alpaca_eval metrics) with pluggable judges."""

from align.eval.errors import EvalError, JudgeAPIError
from align.eval.judges import Judge, JudgeRequest, LocalModelJudge, OpenAIJudge, RewardModelJudge
from align.eval.types import ChatModel

__all__ = ["ChatModel", "EvalError", "Judge", "JudgeAPIError", "JudgeRequest", "LocalModelJudge", "OpenAIJudge",
           "RewardModelJudge"]
