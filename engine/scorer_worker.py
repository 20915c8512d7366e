"""A Ray actor that hosts one scoring model (e.g. a reward model) for the driver.

The engine knows nothing of rewards: it builds whatever `factory()` returns on the actor, calls it
as `obj(prompts, completions, **columns) -> list[float]`, and moves it on and off the accelerator
through the object's optional `offload()` / `onload(device)` / `resident_bytes()` hooks, so the
offload scheduler can keep it resident only during the reward phase.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ScorerWorker:
    def __init__(self, factory: Callable[[], Any]):
        self.obj = factory()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def ready(self) -> bool:
        return True

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        return list(self.obj(prompts, completions, **columns))

    def resident_bytes(self) -> int:
        fn = getattr(self.obj, "resident_bytes", None)
        return int(fn()) if fn is not None else 0

    def offload(self) -> None:
        if hasattr(self.obj, "offload"):
            self.obj.offload()

    def reload(self) -> None:
        if hasattr(self.obj, "onload"):
            self.obj.onload(self.device)


class ScorerHandle:
    """Driver-side callable with the reward protocol; enters the engine's 'reward' phase first."""

    def __init__(self, engine, name: str, actor):
        self.engine, self.name, self.actor = engine, name, actor
        self.__name__ = name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        self.engine.enter_phase("reward")
        return self.engine._get(self.actor.score.remote(prompts, completions, columns), f"scorer {self.name}",
                                role="scorer")
