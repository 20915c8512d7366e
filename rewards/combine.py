"""Combine reward functions: call every component on a batch, normalise, weight and sum.

GRPO stage 2 scores each completion as c1*helpful + c2*safety + c3*rule; `RewardSet` is that sum.
Per component: async functions are awaited, sync ones run in a daemon thread (so a hung function
cannot block interpreter exit) under a wall-clock timeout. When a batch call fails (raises, times
out, or returns something that is not one finite float per sample) the batch is retried one sample
at a time to find the culprit; then on_error="raise" raises a one-line RewardError naming the
function and the sample, and on_error="fallback" gives just the failing samples the fallback.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rewards.errors import RewardError, RewardSpecError, short_repr
from rewards.registry import RewardFn, resolve

_EPS = 1e-8


class RewardComponent(BaseModel):
    """One weighted term of the reward."""

    model_config = ConfigDict(extra="forbid")
    spec: str = Field(description="registered name or 'package.module:function' (or a class)")
    name: str | None = Field(None, description="label in outputs and metrics; default: spec")
    weight: float = 1.0
    normalize: Literal["none", "zscore-running"] = "none"
    kwargs: dict[str, Any] = Field(default_factory=dict, description="call kwargs (or constructor kwargs of a class)")
    timeout_s: float | None = Field(60.0, gt=0, description="wall clock per call")
    on_error: Literal["raise", "fallback"] = "raise"
    fallback: float = Field(0.0, description="value of a failed sample, after normalisation")

    @property
    def label(self) -> str:
        return self.name or self.spec


class RunningMeanStd:
    """Mean and population std over every score seen so far (Chan et al. parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: Sequence[float]) -> None:
        n = len(xs)
        if n == 0:
            return
        b_mean = sum(xs) / n
        b_m2 = sum((x - b_mean) ** 2 for x in xs)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RewardOutput:
    total: list[float]  # sum over components of weight * scaled
    raw: dict[str, list[float]]  # per component as returned (fallback where it failed)
    scaled: dict[str, list[float]]  # after normalisation, before the weight
    failures: dict[str, list[int]]  # per component: sample indices that got the fallback
    metrics: dict[str, float] = field(default_factory=dict)


class RewardSet:
    """Calls every component on a batch; see the module docstring for the failure policy."""

    def __init__(self, components: Sequence[RewardComponent | Mapping[str, Any]]):
        self.components = [c if isinstance(c, RewardComponent) else RewardComponent(**c) for c in components]
        if not self.components:
            raise RewardSpecError("a RewardSet needs at least one component")
        labels = [c.label for c in self.components]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise RewardSpecError(f"duplicate reward component name(s) {dupes}: set `name` to tell them apart")
        self._fns: list[tuple[RewardFn, dict[str, Any]]] = [self._build(c) for c in self.components]
        self.stats = {c.label: RunningMeanStd() for c in self.components if c.normalize == "zscore-running"}
        self.failure_totals = {c.label: 0 for c in self.components}

    @staticmethod
    def _build(c: RewardComponent) -> tuple[RewardFn, dict[str, Any]]:
        obj = resolve(c.spec)
        if not isinstance(obj, type):
            return obj, dict(c.kwargs)
        try:  # a class: build it once, then call the instance with the protocol
            return obj(**c.kwargs), {}
        except Exception as e:  # noqa: BLE001
            raise RewardSpecError(f"reward '{c.label}': cannot build {c.spec}(**kwargs): {short_repr(e)}") from e

    # -- scoring ------------------------------------------------------------------------------
    def score(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> RewardOutput:
        """Synchronous entry point (not from inside a running event loop: use `ascore`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore(prompts, completions, **columns))
        raise RewardError("RewardSet.score() called inside a running event loop; use `await ascore(...)`")

    async def ascore(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> RewardOutput:
        n = len(prompts)
        if len(completions) != n:
            raise RewardError(f"rewards: {len(completions)} completions for {n} prompts")
        for key, col in columns.items():
            if not hasattr(col, "__len__") or isinstance(col, (str, bytes)) or len(col) != n:
                raise RewardError(f"rewards: column '{key}' must be a list of {n} values (one per prompt)")
        results = await asyncio.gather(*(
            self._run_component(c, fn, kw, prompts, completions, columns)
            for c, (fn, kw) in zip(self.components, self._fns)))
        out = RewardOutput(total=[0.0] * n, raw={}, scaled={}, failures={})
        for c, (raw, failed) in zip(self.components, results):
            scaled = self._normalize(c, raw, failed)
            out.raw[c.label], out.scaled[c.label], out.failures[c.label] = raw, scaled, sorted(failed)
            out.total = [t + c.weight * s for t, s in zip(out.total, scaled)]
            self.failure_totals[c.label] += len(failed)
            out.metrics.update(_moments(f"rewards/{c.label}", raw))
            out.metrics[f"rewards/{c.label}/failures"] = float(len(failed))
            out.metrics[f"rewards/{c.label}/failures_total"] = float(self.failure_totals[c.label])
        out.metrics.update(_moments("rewards/total", out.total))
        return out

    def _normalize(self, c: RewardComponent, raw: list[float], failed: set[int]) -> list[float]:
        if c.normalize == "none":
            return list(raw)
        stats = self.stats[c.label]  # update with this batch first, then standardise it
        stats.update([x for i, x in enumerate(raw) if i not in failed])
        return [c.fallback if i in failed else (x - stats.mean) / (stats.std + _EPS) for i, x in enumerate(raw)]

    async def _run_component(self, c: RewardComponent, fn: RewardFn, kwargs: dict[str, Any], prompts: list[str],
                             completions: list[str], columns: dict[str, list[Any]]) -> tuple[list[float], set[int]]:
        clash = sorted(set(kwargs) & set(columns))
        if clash:
            raise RewardError(f"reward {_who(c)}: kwargs {clash} clash with dataset columns of the same name")
        n = len(prompts)
        try:
            return await self._call(c, fn, prompts, completions, {**columns, **kwargs}, n), set()
        except Exception as e:  # noqa: BLE001  (localised below)
            batch_error = e
        scores, errors = [c.fallback] * n, {}
        if n == 1:
            errors[0] = batch_error
        for i in range(n) if n > 1 else ():
            one = {k: [v[i]] for k, v in columns.items()}
            try:
                scores[i] = (await self._call(c, fn, [prompts[i]], [completions[i]], {**one, **kwargs}, 1))[0]
            except Exception as e:  # noqa: BLE001
                errors[i] = e
                if c.on_error == "raise":
                    break
        if not errors and c.on_error == "raise":  # each sample works alone, the batch does not
            raise RewardError(f"reward {_who(c)} failed on the batch of {n} although every sample alone "
                              f"succeeds: {short_repr(batch_error)}") from batch_error
        if errors and c.on_error == "raise":
            i, e = next(iter(errors.items()))
            raise RewardError(f"reward {_who(c)} failed on sample {i}: {short_repr(e)}") from e
        return scores, set(errors)

    async def _call(self, c: RewardComponent, fn: RewardFn, prompts: list[str], completions: list[str],
                    kwargs: dict[str, Any], n: int) -> list[float]:
        try:
            if _is_async(fn):
                result = await asyncio.wait_for(fn(prompts, completions, **kwargs), c.timeout_s)
            else:
                result = await _in_thread(fn, (prompts, completions), kwargs, c.timeout_s, c.label)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no result within {c.timeout_s:g}s") from None
        return validate_scores(result, n)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Running normalisation statistics and failure counts, so a resumed run continues them."""
        return {"stats": {k: s.state_dict() for k, s in self.stats.items()},
                "failure_totals": dict(self.failure_totals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for label, s in state.get("stats", {}).items():
            if label not in self.stats:
                raise RewardError(f"reward state has statistics for '{label}', which is not a zscore-running component")
            self.stats[label].load_state_dict(s)
        self.failure_totals.update({k: int(v) for k, v in state.get("failure_totals", {}).items()
                                    if k in self.failure_totals})


def validate_scores(result: Any, n: int) -> list[float]:
    """A list (or array) of exactly n finite numbers -> list[float]; else a one-line error."""
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
        result = result.tolist()  # numpy / torch
    if not isinstance(result, (list, tuple)):
        raise TypeError(f"returned {type(result).__name__}, expected a list of {n} floats")
    if len(result) != n:
        raise ValueError(f"returned {len(result)} scores for {n} samples")
    scores = []
    for j, v in enumerate(result):
        if v is None or isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
            raise TypeError(f"score {j} is {type(v).__name__} {str(v)[:40]!r}, expected a float")
        x = float(v)
        if not math.isfinite(x):
            raise ValueError(f"score {j} is {x}")
        scores.append(x)
    return scores


def _who(c: RewardComponent) -> str:
    return f"'{c.name}' ({c.spec})" if c.name and c.name != c.spec else f"'{c.spec}'"


def _is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


async def _in_thread(fn: RewardFn, args: tuple, kwargs: dict[str, Any], timeout: float | None, label: str) -> Any:
    """Run a sync function in a fresh daemon thread; on timeout we stop waiting (a Python thread
    cannot be killed) and the thread finishes, or hangs, in the background."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            ok, value = True, fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            ok, value = False, e
        except BaseException as e:  # noqa: BLE001  (SystemExit in a reward must not escape as such)
            ok, value = False, RuntimeError(f"raised {type(e).__name__}")
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is gone (we timed out and the caller moved on)

    threading.Thread(target=target, name=f"reward:{label}", daemon=True).start()
    return await asyncio.wait_for(fut, timeout)


def _moments(prefix: str, xs: list[float]) -> dict[str, float]:
    mean = sum(xs) / len(xs) if xs else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else 0.0
    return {f"{prefix}/mean": mean, f"{prefix}/std": std}
