"""`code` reward: the fraction of a sample's unit tests its extracted program passes, sandboxed.

Columns: `tests` (python source with asserts, or a list of assert strings; HumanEval's
`def check(candidate)` works with `entry_point`), optional `entry_point` (function name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.errors import RewardError
from rewards.registry import register
from rewards.sandbox import Sandbox, SandboxConfig, extract_code


@register("code")
def code_reward(prompts: list[str], completions: list[str], tests: list[Any],
                entry_point: list[str | None] | None = None, sandbox: Mapping[str, Any] | None = None,
                **_: Any) -> list[float]:
    """passed/total asserts per sample (0.0 for timeouts, crashes, load errors and hostile code).
    `sandbox`: SandboxConfig fields, e.g. {"timeout_s": 5, "memory_mb": 512}."""
    box = Sandbox(SandboxConfig(**(sandbox or {})))
    codes = [extract_code(c) for c in completions]
    results = box.run_many(codes, list(tests), list(entry_point) if entry_point is not None else None)
    for i, r in enumerate(results):
        if r.status == "setup-error":  # our infrastructure, not the sample: never a silent 0
            raise RewardError(f"sample {i}: the code sandbox could not start: {r.detail}")
    return [r.score for r in results]
