"""Ray failures as the one line an EngineError carries: what the call was, which actor, what went wrong.

    failure_line(e, "generate", timeout, role="rollout engine 1")
        -> "rollout actor died during generate (rollout engine 1, ActorDiedError); restart the run to continue"
"""
from __future__ import annotations

import re
from typing import Any

import ray

_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")


def init_failure_cause(e: BaseException) -> str:
    """One line naming what an actor's constructor raised: `Type: first line of its message`.

    Ray wraps the constructor's exception (traceback text included) in an ActorDiedError; the
    original exception is its `.cause` (or the cause's `.cause`) when Ray could pickle it, else we
    take the last `SomethingError: message` line of the traceback text.
    """
    cause: Any = e
    for _ in range(4):
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if cause is not e and not hasattr(cause, "actor_init_failed"):
        text = str(cause).strip()
        first = text.splitlines()[0].strip() if text else ""
        return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = [m for m in map(_ERROR_LINE.match, lines) if m and m.group(1) not in ("RayTaskError", "ActorDiedError")]
    if found:
        return f"{found[-1].group(1)}: {found[-1].group(2)}"
    return lines[-1] if lines else type(e).__name__


def failure_line(e: BaseException, what: str, timeout: float, role: str | None = None) -> str:
    """The line for an exception ray.get raised on call `what` to `role` (None: rollout or training, from what):
    a task error (what the call raised), a timeout, an actor that died, or one whose constructor raised."""
    if isinstance(e, ray.exceptions.GetTimeoutError):
        return f"{what} timed out after {timeout:.0f}s" + (f" ({role})" if role else "")
    if not isinstance(e, ray.exceptions.RayActorError):
        return f"{what} failed on {role or 'an actor'}: {init_failure_cause(e)}"
    who = role or ("rollout" if "rollout" in what else "training")
    name = ""
    if who.startswith("rollout engine"):                  # which of the N engines
        who, name = "rollout", f"{who}, "
    if getattr(e, "actor_init_failed", False):          # the constructor raised: say what it raised
        return f"{who} actor failed to start ({name.rstrip(', ')}): {init_failure_cause(e)}" \
            if name else f"{who} actor failed to start: {init_failure_cause(e)}"
    return f"{who} actor died during {what} ({name}{type(e).__name__}); restart the run to continue"
