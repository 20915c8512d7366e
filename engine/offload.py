"""Phase-wise offloading: before each phase only what that phase declared stays on the accelerator.

When rollout and training share one GPU, the policy weights, optimizer state, reference model and
the rollout engine's weights + KV cache cannot all be resident at once. Each phase (rollout,
reward, reference, train, ...) declares the items it needs; `OffloadScheduler.enter(phase)`
offloads everything else first (freeing memory) and then brings the declared items back.

Two levels:
- `ModuleSlot` / `OptimizerSlot` / `Offloader` live in the process that owns the tensors (a train
  worker). In "real" mode offloading copies every tensor into a separate host buffer and frees the
  original (`param.data = empty`), so a forward of an offloaded model fails loudly and a reload
  restores bit-identical tensors. In "accounting" mode they only track residency.
- `OffloadScheduler` lives in the driver: it knows every item's size and how to offload/reload it
  (usually a Ray call into the owning actor), computes the plan per phase and logs the bytes
  resident per phase. In "accounting" mode (CPU-only machines) it never calls the owners.
The rollout engine is two items, its weights and its KV cache, moved by the engine itself (vLLM's
sleep()/wake_up(tags); engine_release / engine_restore in the driver): the refit phase brings back
only the weights, the rollout phase then the KV cache. With colocated ranks and engines there is one
scheduler per shared GPU (rank g with engine g), so the bytes it reports are that GPU's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Mode = Literal["real", "accounting"]

DEFAULT_PHASES: dict[str, frozenset[str]] = {
    "rollout": frozenset({"rollout_weights", "rollout_kv"}),
    "reward": frozenset(),
    "reference": frozenset({"ref"}),
    "policy": frozenset({"policy"}),                       # policy forward only (old log-probs)
    "train": frozenset({"policy", "optimizer"}),
    "refit": frozenset({"policy", "rollout_weights"}),     # trainer weights -> engine; its KV cache stays released
}


class OffloadedError(RuntimeError):
    """A model or optimizer was used while its tensors were offloaded."""


def resolve_mode(mode: str, cuda: bool | None = None) -> Mode:
    """auto = real offloading on GPUs (it frees memory there), accounting only on CPU."""
    if mode == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return "real" if cuda else "accounting"
    if mode not in ("real", "accounting"):
        raise ValueError(f"offload mode must be auto|real|accounting, got {mode!r}")
    return mode  # type: ignore[return-value]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A separate host copy (pinned when the source is on a GPU, for fast reloads)."""
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if t.is_cuda else host


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: an FSDP2 parameter is a DTensor whose numel() is the global one."""
    return t.to_local() if hasattr(t, "to_local") else t


class ModuleSlot:
    """One nn.Module's parameters and buffers, offloadable to host memory."""

    def __init__(self, name: str, module: nn.Module, mode: Mode):
        self.name, self.module, self.mode = name, module, mode
        self.resident = True
        self._host: dict[str, tuple[torch.Tensor, torch.device]] = {}
        self._hook = None

    def _tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        yield from self.module.named_parameters(remove_duplicate=True)
        yield from self.module.named_buffers(remove_duplicate=True)

    @property
    def nbytes(self) -> int:
        if not self.resident and self.mode == "real":
            return sum(h.numel() * h.element_size() for h, _ in self._host.values())
        return sum(_local(t).numel() * _local(t).element_size() for _, t in self._tensors())

    def offload(self) -> None:
        if not self.resident:
            return
        if self.mode == "real":
            for name, t in self._tensors():
                self._host[name] = (_to_host(t), t.device)
                t.grad = None
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self._hook = self.module.register_forward_pre_hook(self._refuse)
        self.resident = False

    def reload(self) -> None:
        if self.resident:
            return
        if self.mode == "real":
            for name, t in self._tensors():
                host, device = self._host.pop(name)
                t.data = host.to(device, non_blocking=False)
        self._hook.remove()
        self._hook = None
        self.resident = True

    def _refuse(self, module, args):
        raise OffloadedError(f"model '{self.name}' is offloaded; enter a phase that declares it first")


class OptimizerSlot:
    """An optimizer's state tensors (AdamW moments), offloadable to host memory."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, mode: Mode):
        self.name, self.optimizer, self.mode = name, optimizer, mode
        self.resident = True
        self._host: dict[tuple[int, str], tuple[torch.Tensor, torch.device]] = {}
        optimizer.register_step_pre_hook(self._refuse)

    def _tensors(self) -> Iterable[tuple[tuple[int, str], dict, str]]:
        for i, state in enumerate(self.optimizer.state.values()):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    yield (i, k), state, k

    @property
    def nbytes(self) -> int:
        if not self.resident and self.mode == "real":
            return sum(h.numel() * h.element_size() for h, _ in self._host.values())
        return sum(_local(s[k]).numel() * _local(s[k]).element_size() for _, s, k in self._tensors())

    def offload(self) -> None:
        if not self.resident:
            return
        if self.mode == "real":
            for key, state, k in self._tensors():
                t = state[k]
                self._host[key] = (_to_host(t), t.device)
                state[k] = torch.empty(0, dtype=t.dtype, device=t.device)
        self.resident = False

    def reload(self) -> None:
        if self.resident:
            return
        if self.mode == "real":
            for key, state, k in self._tensors():
                host, device = self._host.pop(key)
                state[k] = host.to(device)
        self.resident = True

    def _refuse(self, optimizer, args, kwargs):
        if not self.resident:
            raise OffloadedError(f"optimizer '{self.name}' is offloaded; enter a phase that declares it first")


class Offloader:
    """The slots of one process (a train worker): offload/reload by name."""

    def __init__(self, mode: Mode):
        self.mode = mode
        self.slots: dict[str, ModuleSlot | OptimizerSlot] = {}

    def add_module(self, name: str, module: nn.Module) -> None:
        self.slots[name] = ModuleSlot(name, module, self.mode)

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.slots[name] = OptimizerSlot(name, optimizer, self.mode)

    def _get(self, name: str):
        if name not in self.slots:
            raise KeyError(f"no offload slot named {name!r} (have {sorted(self.slots)})")
        return self.slots[name]

    def offload(self, names: Iterable[str]) -> None:
        for n in names:
            self._get(n).offload()

    def reload(self, names: Iterable[str]) -> None:
        for n in names:
            self._get(n).reload()

    def sizes(self) -> dict[str, int]:
        """Bytes per slot (as if resident: optimizer state grows after the first step)."""
        return {n: s.nbytes for n, s in self.slots.items()}

    def resident(self) -> set[str]:
        return {n for n, s in self.slots.items() if s.resident}


@dataclass
class Item:
    """A driver-side handle: size and how to move it (usually Ray calls into the owner)."""

    name: str
    nbytes: Callable[[], int] | int
    offload: Callable[[], None]
    reload: Callable[[], None]

    def size(self) -> int:
        return self.nbytes() if callable(self.nbytes) else self.nbytes


@dataclass
class Plan:
    phase: str
    offload: list[str]
    reload: list[str]
    resident: list[str]
    resident_bytes: int


@dataclass
class OffloadScheduler:
    """Computes and applies per-phase residency. In accounting mode the owners are never called."""

    mode: Mode = "accounting"
    phases: dict[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_PHASES))
    items: dict[str, Item] = field(default_factory=dict)
    resident: set[str] = field(default_factory=set)
    history: list[Plan] = field(default_factory=list)
    current: str | None = None

    def register(self, item: Item, resident: bool = True) -> None:
        self.items[item.name] = item
        if resident:
            self.resident.add(item.name)

    def declare(self, phase: str, items: Iterable[str]) -> None:
        """Add or redefine a phase (e.g. a 'reward' phase that needs a reward model resident)."""
        self.phases[phase] = frozenset(items)

    def plan(self, phase: str) -> Plan:
        if phase not in self.phases:
            raise KeyError(f"unknown offload phase {phase!r} (have {sorted(self.phases)})")
        wanted = {n for n in self.phases[phase] if n in self.items}
        offload = sorted(self.resident - wanted)
        reload = sorted(wanted - self.resident)
        sizes = {n: self.items[n].size() for n in wanted}
        return Plan(phase, offload, reload, sorted(wanted), sum(sizes.values()))

    def enter(self, phase: str) -> Plan:
        """Offload first (so memory is free), then reload what the phase declared."""
        p = self.plan(phase)
        if self.mode == "real":
            for n in p.offload:
                self.items[n].offload()
        self.resident -= set(p.offload)
        if self.mode == "real":
            for n in p.reload:
                self.items[n].reload()
        self.resident |= set(p.reload)
        self.current = phase
        self.history.append(p)
        log.info("offload[%s] phase %s: resident %s = %.1f MB (offloaded %s, reloaded %s)",
                 self.mode, phase, p.resident or "nothing", p.resident_bytes / 1e6, p.offload or "-", p.reload or "-")
        return p
