"""Combine reward functions: call every component on a batch, normalise, weight and sum.

GRPO stage 2 scores each completion as c1*helpful + c2*safety + c3*rule; `RewardSet` is that sum.
Per component: async functions are awaited, sync ones run in a daemon thread under a wall-clock
timeout. No bad sample or slow scorer ends a run by itself; by default (on_error="fallback"):
  * a sample a function reports as failed (it returns `SampleScores` with `failed`/`timed_out`
    indices, as the code and math rewards do for per-sample timeouts) gets the fallback;
  * a batch call that raises or returns something that is not one finite float per sample is
    retried one sample at a time, concurrently for async functions, under one shared deadline,
    and just the failing samples get the fallback;
  * a sync batch call that times out is NOT retried: a Python thread cannot be killed, so retrying
    would leak one hung thread per sample. Every sample of it gets the fallback and counts as a
    timeout (async ones are retried like errors: cancelling them leaks nothing). Functions that enforce per-sample timeouts themselves (marked `@own_timeouts`, like
    `code` and `math_accuracy`, which kill their sandboxes and worker processes) get no batch
    timeout unless the component sets `timeout_s` explicitly.
Each step's `rewards/<component>/failures` and `/timeouts` counts are in the metrics, and
`check_failure_share` is the one rule that stops a run: a component failing on more than
`max_share` of a batch. on_error="raise" raises at the first failure instead (one line naming the
function and the sample). Scoring is two steps (`ascore` = both): `araw` (raw scores of any part of a
batch, no state touched: parts may run concurrently, in any order) and `combine` (the running normalisers
and failure counts updated in the order given: prompt order), see rewards/raw_scores.py.
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

from rewards.errors import RewardError, RewardSetupError, RewardSpecError, short_repr
from rewards.raw_scores import RawScores
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
    timeout_s: float | None = Field(60.0, gt=0, description="wall clock per call (none by default for "
                                    "functions marked @own_timeouts)")
    on_error: Literal["raise", "fallback"] = "fallback"
    fallback: float = Field(0.0, description="value of a failed sample, after normalisation")
    where: dict[str, list[Any]] | None = Field(
        None, description="score only the samples whose dataset column has one of these values, e.g. "
                          "{data_source: [chat]} (GRPO names each data source's rows); the others get 0, are "
                          "not sent to the function and stay out of its running normaliser. None = every sample")

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
    failures: dict[str, list[int]]  # per component: sample indices that got the fallback (timeouts too)
    timeouts: dict[str, list[int]] = field(default_factory=dict)  # per component: the failures that timed out
    metrics: dict[str, float] = field(default_factory=dict)


class SampleScores(list):
    """What a reward may return instead of a plain list: the scores, plus the indices of samples it
    could not judge (`failed`; `timed_out` is the subset that ran out of time). RewardSet gives them
    the component's fallback and counts them."""

    def __init__(self, scores=(), failed=(), timed_out=()):
        super().__init__(scores)
        self.timed_out = set(timed_out)
        self.failed = set(failed) | self.timed_out


def own_timeouts(fn):
    """Mark a reward that bounds each sample's time itself (killing what overruns): RewardSet then
    puts no batch timeout around it unless the component sets `timeout_s`."""
    fn.own_timeouts = True
    return fn


def check_failure_share(output: RewardOutput, max_share: float) -> None:
    """Raise a one-line RewardError naming the first component whose failed samples are more than
    `max_share` of the batch (0.5: more than half). The GRPO loop calls it after every step."""
    n = len(output.total)
    for label, failed in output.failures.items():
        if n and len(failed) / n > max_share:
            timeouts = len(output.timeouts.get(label, ()))
            raise RewardError(f"reward '{label}' failed on {len(failed)} of {n} samples in this step ({timeouts} "
                              f"timeouts), more than grpo.max_reward_failure_share={max_share:g}; "
                              f"first failing sample {failed[0]}")


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
        """Score a batch: raw scores (araw), then the ordered normalise/combine step (combine)."""
        return self.combine(await self.araw(prompts, completions, **columns))

    async def araw(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> RawScores:
        """Every component's raw scores on these samples, no normaliser or counter touched: any part of a
        batch may be scored this way, concurrently and in any order, then combined in prompt order."""
        n = len(prompts)
        if len(completions) != n:
            raise RewardError(f"rewards: {len(completions)} completions for {n} prompts")
        for key, col in columns.items():
            if not hasattr(col, "__len__") or isinstance(col, (str, bytes)) or len(col) != n:
                raise RewardError(f"rewards: column '{key}' must be a list of {n} values (one per prompt)")
        scopes = [self._scope(c, columns, n) for c in self.components]
        results = await asyncio.gather(*(
            self._run_component(c, fn, kw, [prompts[i] for i in idx], [completions[i] for i in idx],
                                {k: [v[i] for i in idx] for k, v in columns.items()}) if idx else _nothing()
            for c, (fn, kw), idx in zip(self.components, self._fns, scopes)))
        raw = RawScores(n, {}, {}, {})
        for c, idx, (sub_raw, sub_failed, sub_timed_out) in zip(self.components, scopes, results):
            scores: list[float | None] = [None] * n           # out of scope: not scored
            for j, i in enumerate(idx):
                scores[i] = sub_raw[j]
            raw.scores[c.label] = scores
            raw.failed[c.label], raw.timed_out[c.label] = {idx[j] for j in sub_failed}, {idx[j] for j in sub_timed_out}
        return raw

    def combine(self, raw: RawScores | Sequence[RawScores]) -> RewardOutput:
        """The ordered step: normalise (updating the running normalisers with the samples in the order given),
        weight and sum. A sequence of parts is concatenated first: pass them in prompt order."""
        raw = RawScores.concat(raw) if not isinstance(raw, RawScores) else raw
        n = raw.n
        out = RewardOutput(total=[0.0] * n, raw={}, scaled={}, failures={})
        for c in self.components:
            scores = raw.scores[c.label]
            idx = [i for i, x in enumerate(scores) if x is not None]
            local = {i: j for j, i in enumerate(idx)}
            sub_raw = [scores[i] for i in idx]
            failed, timed_out = raw.failed.get(c.label, set()), raw.timed_out.get(c.label, set())
            sub_scaled = self._normalize(c, sub_raw, {local[i] for i in failed})
            raw_full, scaled = [0.0] * n, [0.0] * n           # out of scope: 0, not scored
            for j, i in enumerate(idx):
                raw_full[i], scaled[i] = sub_raw[j], sub_scaled[j]
            out.raw[c.label], out.scaled[c.label], out.failures[c.label] = raw_full, scaled, sorted(failed)
            out.timeouts[c.label] = sorted(timed_out)
            out.total = [t + c.weight * s for t, s in zip(out.total, scaled)]
            self.failure_totals[c.label] += len(failed)
            out.metrics.update(_moments(f"rewards/{c.label}", sub_raw))       # moments over scored samples
            if c.where is not None:
                out.metrics[f"rewards/{c.label}/scored"] = float(len(idx))
            out.metrics[f"rewards/{c.label}/failures"] = float(len(failed))
            out.metrics[f"rewards/{c.label}/timeouts"] = float(len(timed_out))
            out.metrics[f"rewards/{c.label}/failures_total"] = float(self.failure_totals[c.label])
        out.metrics.update(_moments("rewards/total", out.total))
        return out

    @staticmethod
    def _scope(c: RewardComponent, columns: dict[str, list[Any]], n: int) -> list[int]:
        """Indices of the samples component c scores (its `where`)."""
        if c.where is None:
            return list(range(n))
        for key in c.where:
            if key not in columns:
                raise RewardError(f"reward {_who(c)}: `where` names column '{key}', which the data does not have "
                                  f"(columns: {sorted(columns)})")
        return [i for i in range(n) if all(columns[k][i] in allowed for k, allowed in c.where.items())]

    def _normalize(self, c: RewardComponent, raw: list[float], failed: set[int]) -> list[float]:
        if c.normalize == "none":
            return list(raw)
        stats = self.stats[c.label]  # update with this batch first, then standardise it
        stats.update([x for i, x in enumerate(raw) if i not in failed])
        return [c.fallback if i in failed else (x - stats.mean) / (stats.std + _EPS) for i, x in enumerate(raw)]

    async def _run_component(self, c: RewardComponent, fn: RewardFn, kwargs: dict[str, Any], prompts: list[str],
                             completions: list[str], columns: dict[str, list[Any]]
                             ) -> tuple[list[float], set[int], set[int]]:
        """(scores, failed, timed_out) for one component; see the module docstring."""
        clash = sorted(set(kwargs) & set(columns))
        if clash:
            raise RewardError(f"reward {_who(c)}: kwargs {clash} clash with dataset columns of the same name")
        n = len(prompts)
        timeout = c.timeout_s if "timeout_s" in c.model_fields_set or not getattr(fn, "own_timeouts", False) \
            else None
        try:
            scores = await self._call(c, fn, prompts, completions, {**columns, **kwargs}, n, timeout)
        except RewardSetupError as e:
            raise RewardSetupError(f"reward {_who(c)}: {e}") from None
        except TimeoutError as e:  # sync: not retried, see the module docstring
            if _is_async(fn):
                return await self._localise(c, fn, kwargs, prompts, completions, columns, e, timeout)
            if c.on_error == "raise":
                raise RewardError(f"reward {_who(c)} failed on the batch of {n}: {short_repr(e)}") from e
            return [c.fallback] * n, set(range(n)), set(range(n))
        except Exception as e:  # noqa: BLE001  (localised below)
            return await self._localise(c, fn, kwargs, prompts, completions, columns, e, timeout)
        failed = set(getattr(scores, "failed", ())) & set(range(n))
        timed_out = set(getattr(scores, "timed_out", ())) & failed
        if failed and c.on_error == "raise":
            i = min(failed)
            why = "timed out" if i in timed_out else "could not be scored"
            raise RewardError(f"reward {_who(c)} failed on sample {i}: it {why}")
        return [c.fallback if i in failed else x for i, x in enumerate(scores)], failed, timed_out

    async def _localise(self, c: RewardComponent, fn: RewardFn, kwargs: dict[str, Any], prompts: list[str],
                        completions: list[str], columns: dict[str, list[Any]], batch_error: Exception,
                        timeout: float | None) -> tuple[list[float], set[int], set[int]]:
        """Retry sample by sample (concurrently when async) to find which samples fail."""
        n = len(prompts)
        if n == 1:
            errors: dict[int, Exception] = {0: batch_error}
            scores = [c.fallback]
        else:
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout

            async def one(i: int) -> float:
                left = None if deadline is None else max(0.01, deadline - asyncio.get_running_loop().time())
                single = {k: [v[i]] for k, v in columns.items()}
                result = await self._call(c, fn, [prompts[i]], [completions[i]], {**single, **kwargs}, 1, left)
                if getattr(result, "failed", None):
                    raise RuntimeError("could not be scored")
                return result[0]

            if _is_async(fn):
                got = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
            else:  # one thread at a time: a hung one is not joined by n more
                got = []
                for i in range(n):
                    try:
                        got.append(await one(i))
                    except Exception as e:  # noqa: BLE001
                        got.append(e)
                        if isinstance(e, TimeoutError) or c.on_error == "raise":
                            got += [e] * (n - i - 1)
                            break
            errors = {i: g for i, g in enumerate(got) if isinstance(g, BaseException)}
            scores = [c.fallback if i in errors else g for i, g in enumerate(got)]
        if not errors and c.on_error == "raise":  # each sample works alone, the batch does not
            raise RewardError(f"reward {_who(c)} failed on the batch of {n} although every sample alone "
                              f"succeeds: {short_repr(batch_error)}") from batch_error
        if errors and c.on_error == "raise":
            i, e = min(errors.items())
            raise RewardError(f"reward {_who(c)} failed on sample {i}: {short_repr(e)}") from e
        if not errors:  # only the batch fails: every sample alone is fine
            return scores, set(), set()
        return scores, set(errors), {i for i, e in errors.items() if isinstance(e, TimeoutError)}

    async def _call(self, c: RewardComponent, fn: RewardFn, prompts: list[str], completions: list[str],
                    kwargs: dict[str, Any], n: int, timeout: float | None) -> list[float]:
        try:
            if _is_async(fn):
                result = await asyncio.wait_for(fn(prompts, completions, **kwargs), timeout)
            else:
                result = await _in_thread(fn, (prompts, completions), kwargs, timeout, c.label)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no result within {timeout:g}s") from None
        scores = validate_scores(result, n)
        return SampleScores(scores, getattr(result, "failed", ()), getattr(result, "timed_out", ())) \
            if isinstance(result, SampleScores) else scores

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


async def _nothing() -> tuple[list[float], set[int], set[int]]:
    """A component with no sample in scope: not called."""
    return [], set(), set()


def _moments(prefix: str, xs: list[float]) -> dict[str, float]:
    mean = sum(xs) / len(xs) if xs else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else 0.0
    return {f"{prefix}/mean": mean, f"{prefix}/std": std}
