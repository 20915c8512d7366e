"""Rewards for GRPO: rule rewards (math, exact match, format, length), sandboxed code execution,
reward models (local Hugging Face or remote HTTP) and their weighted, normalised combination.

Protocol: fn(prompts: list[str], completions: list[str], **columns) -> list[float], sync or async.
Heavy modules (transformers, the sandbox, math-verify) load only when used.
"""

from rewards.combine import (RewardComponent, RewardOutput, RewardSet, RunningMeanStd, SampleScores,
                             check_failure_share, own_timeouts, validate_scores)
from rewards.errors import RewardError, RewardSetupError, RewardSpecError
from rewards.registry import register, registered, resolve

__all__ = [
    "RewardComponent", "RewardError", "RewardOutput", "RewardSet", "RewardSetupError", "RewardSpecError",
    "RunningMeanStd", "SampleScores", "check_failure_share", "own_timeouts", "register", "registered", "resolve", "validate_scores",
]
