"""One-step off-policy GRPO (grpo.async_rollout): generate batch k+1 while the trainer trains on batch k.

Split placement only (the rollout engines and the trainer have their own devices). Step k:

    launch   B_{k+1} = sample_groups(...)        in a driver thread, on the rollout weights v_{k-1}
    train    B_k          v_{k-1} -> v_k          in the main thread, meanwhile
    wait     for B_{k+1}  (generated and scored: each engine's groups are raw-scored as soon as that
                          engine finishes, the normalisers updated once in prompt order: dynamic_sampling.py)
    refit    v_k -> rollout engines               only now, so B_{k+1} was sampled entirely by v_{k-1}

so B_k is sampled by v_{k-2} and trained from v_{k-1}: staleness = (trainer version) - (sampling version)
is 0 at step 1 (sampled before any update) and exactly 1 from step 2 on, by construction, whatever the
timings. Each batch carries the version that sampled it; one staler than max_staleness is never trained on.
The importance-sampling correction (align/grpo/objective.py, is_correction) compares the trainer against
the rollout's own log-probs (behavior_logp), which is what makes the off-policy step sound.

Determinism: the background thread is the only user of the prompt stream, the rewards (whose running
normalisers are updated batch by batch, in prompt order) and the rollout engines while it runs; the main
thread only uses the trainer. Prompts and seeds are those of the synchronous loop. Checkpoints save the
in-flight batch (InFlight, pickled), so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.grpo.dynamic_sampling import Groups, sample_groups
from model.atomic import atomic_write

log = logging.getLogger(__name__)
INFLIGHT_FILE = "inflight.pkl"


@dataclass
class InFlight:
    """A sampled and scored batch waiting to be trained on, and the rollout weight version that sampled it."""

    groups: Groups
    version: int


class BackgroundRollout:
    """sample_groups in a thread (rollout + reward scoring); result() re-raises what it raised."""

    def __init__(self, engine, tokenizer, cfg, stream, rewards, timeout_s: float):
        self.version = int(engine.rollout_version)
        self.timeout_s = timeout_s
        self._out: InFlight | None = None
        self._err: BaseException | None = None
        self.seconds = 0.0

        def run() -> None:
            t0 = time.perf_counter()
            try:
                groups = sample_groups(engine, tokenizer, cfg, stream, rewards, cfg.sampling.seed)
                self._out = InFlight(groups, self.version)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._err = e
            self.seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name="grpo-async-rollout", daemon=True)
        self._thread.start()

    def result(self) -> InFlight:
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"async rollout of the next batch did not finish within {self.timeout_s:.0f}s")
        if self._err is not None:
            raise self._err
        return self._out  # type: ignore[return-value]


def async_step(engine, tokenizer, cfg, step_cfg_of: Callable[[int], object], stream, rewards, samples, step: int,
               inflight: InFlight | None, grpo_step: Callable[..., dict]) -> tuple[dict, InFlight | None]:
    """Step `step` (0-based) of the async loop: returns its metrics and the batch for the next step."""
    t0 = time.perf_counter()
    if inflight is None:                                   # the first step: nothing was generated ahead
        groups = sample_groups(engine, tokenizer, step_cfg_of(step), stream, rewards, step_cfg_of(step).sampling.seed)
        inflight = InFlight(groups, int(engine.rollout_version))
    staleness = int(engine.policy_version) - inflight.version
    timeout = engine.cluster_cfg.call_timeout_s * (cfg.dynamic_sampling_max_rounds + 1)
    ahead = BackgroundRollout(engine, tokenizer, step_cfg_of(step + 1), stream, rewards, timeout) \
        if step + 1 < cfg.steps else None
    nxt: list[InFlight | None] = [None]

    def wait_for_next() -> None:
        nxt[0] = ahead.result() if ahead is not None else None

    if staleness > cfg.async_rollout.max_staleness:        # by construction this does not happen; never train on it
        log.warning("step %d: batch sampled by version %d is %d versions stale (> max_staleness %d): dropped",
                    step + 1, inflight.version, staleness, cfg.async_rollout.max_staleness)
        wait_for_next()
        metrics = {"async/dropped": 1.0}
    else:
        metrics = grpo_step(engine, tokenizer, step_cfg_of(step), stream, rewards, samples, step + 1,
                            groups=inflight.groups, before_refit=wait_for_next)
        metrics["async/dropped"] = 0.0
    step_s = time.perf_counter() - t0
    rollout_busy = ahead.seconds if ahead is not None else 0.0
    busy_train = metrics.get("time/train", 0.0) + metrics.get("time/refit", 0.0)
    metrics.update({"async/staleness": float(staleness), "async/sampled_version": float(inflight.version),
                    "time/train_idle_share": max(0.0, 1 - busy_train / max(step_s, 1e-9)),
                    "time/step": step_s, "time/rollout_ahead": rollout_busy,
                    "time/rollout_idle_share": max(0.0, 1 - rollout_busy / max(step_s, 1e-9))})
    return metrics, nxt[0]


def save_inflight(dir_: Path, inflight: InFlight | None) -> None:
    if inflight is not None:
        atomic_write(dir_ / INFLIGHT_FILE, lambda tmp: Path(tmp).write_bytes(pickle.dumps(inflight)))


def load_inflight(ckpt: Path) -> InFlight | None:
    path = ckpt / INFLIGHT_FILE
    return pickle.loads(path.read_bytes()) if path.exists() else None
