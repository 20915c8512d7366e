"""Reward functions by name: `register` built-ins, `resolve` names or `package.module:function`.

The protocol every reward follows (sync or async):

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`columns` are the dataset's extra columns, each a list aligned with `prompts`; a function takes
the columns it needs by name and must accept (and ignore) the rest via **kwargs. A spec may also
name a class: RewardSet then builds it once with the component's kwargs and calls the instance.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rewards.errors import RewardSpecError, short_repr

RewardFn = Callable[..., Any]  # (prompts, completions, **columns) -> list[float] | Awaitable[list[float]]

_REGISTRY: dict[str, RewardFn] = {}
_BUILTIN_MODULES = ("rewards.rule", "rewards.code_reward", "rewards.remote")
# Built-ins whose modules are heavy to import (torch, transformers): loaded on first use only.
_LAZY = {"reward_model": "rewards.model_reward:RewardModelScorer"}
_builtins_loaded = False


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` resolvable as `name`. Re-registering a different object is an error."""

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise RewardSpecError(f"reward '{name}': {fn!r} is not callable")
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and _qualname(old) != _qualname(fn):
            raise RewardSpecError(f"reward '{name}' is already registered to {_qualname(old)}")
        _REGISTRY[name] = fn
        return fn

    return deco


def registered() -> list[str]:
    """Names of all registered rewards (built-ins included)."""
    _load_builtins()
    return sorted({*_REGISTRY, *_LAZY})


def resolve(spec: str) -> RewardFn:
    """A registered name, or a dotted path `package.module:function` (`module:Class.attr` too)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        return _import(spec)
    if spec in _LAZY and spec not in _REGISTRY:
        _REGISTRY[spec] = _import(_LAZY[spec])
    if spec not in _REGISTRY:
        _load_builtins()
    if spec not in _REGISTRY:
        known = ", ".join(sorted({*_REGISTRY, *_LAZY}))
        raise RewardSpecError(f"unknown reward '{spec}' (registered: {known}; or use 'package.module:function')")
    return _REGISTRY[spec]


def _import(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardSpecError(f"reward spec '{spec}' must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any import-time failure is the spec's problem)
        raise RewardSpecError(f"reward spec '{spec}': cannot import '{module_name}': {short_repr(e)}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward spec '{spec}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(f"reward spec '{spec}': {type(obj).__name__} object is not callable")
    return obj


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for name in _BUILTIN_MODULES:
            importlib.import_module(name)
        _builtins_loaded = True


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

