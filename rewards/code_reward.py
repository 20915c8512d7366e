"""`code` reward: the fraction of a sample's unit tests its extracted program passes, sandboxed.

Columns: `tests` (python source with asserts, or a list of assert strings; HumanEval's
`def check(candidate)` works with `entry_point`), optional `entry_point` (function name).

Each sample's time is bounded by the sandbox (`sandbox.timeout_s`, enforced by killing its whole
namespace), so the reward is `@own_timeouts`: no batch timeout can end a step because a few
completions loop. A sample that times out scores 0 and is reported as a failure (and a timeout),
which the GRPO loop weighs with `grpo.max_reward_failure_share`. Where the sandbox cannot get its
namespaces (no root and no unprivileged user namespaces) every sample is refused with one line
naming `allow_weak_isolation: true`; that setting runs the audit hook alone and is logged once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.combine import SampleScores, own_timeouts
from rewards.errors import RewardSetupError
from rewards.registry import register
from rewards.sandbox import Sandbox, SandboxConfig, extract_code


@register("code")
@own_timeouts
def code_reward(prompts: list[str], completions: list[str], tests: list[Any],
                entry_point: list[str | None] | None = None, sandbox: Mapping[str, Any] | None = None,
                **_: Any) -> SampleScores:
    """passed/total asserts per sample (0.0 for timeouts, crashes, load errors and hostile code).
    `sandbox`: SandboxConfig fields, e.g. {"timeout_s": 5, "memory_mb": 512}."""
    box = Sandbox(SandboxConfig(**(sandbox or {})))
    codes = [extract_code(c) for c in completions]
    results = box.run_many(codes, list(tests), list(entry_point) if entry_point is not None else None)
    for i, r in enumerate(results):
        if r.status == "setup-error":  # our infrastructure, not the sample: never a silent 0
            raise RewardSetupError(f"sample {i}: the code sandbox could not start: {r.detail}")
    return SampleScores([r.score for r in results], timed_out=[i for i, r in enumerate(results)
                                                               if r.status == "timeout"])
