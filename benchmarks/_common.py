"""Shared pieces of the benchmark scripts: model sizes, checkpoints, machine line, RSS sampling, tables.

Both sizes keep kv_lora_rank=512 and qk_rope_head_dim=64 (the only MLA shape vLLM's CPU kernel takes).
"""
from __future__ import annotations

import os
import re
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

import model
from model.tokenizer import train_tokenizer

# `tiny` is the preset as is (5.7M params). `100m`: 102.3M total, 61.8M activated per token
# (12 layers, hidden 768, 12 heads, 1 dense layer then 11 MoE layers of 8 routed experts (top-2) + 1 shared).
SIZES: dict[str, dict] = {
    "tiny": {},
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 qk_nope_head_dim=64, v_head_dim=64, intermediate_size=2048, moe_intermediate_size=256,
                 n_routed_experts=8, num_experts_per_tok=2),
}


def tokenizer_texts() -> list[str]:
    """What the benchmark tokenizer is trained on: the counting/arithmetic prompts the GRPO benchmark uses."""
    return [f"{i} plus {j} is {i + j}. Count to {k}: " + " ".join(str(x) for x in range(k))
            for i in range(30) for j in range(10) for k in (3, 7)]


def make_checkpoint(root: Path, size: str, seed: int = 0, with_tokenizer: bool = False) -> Path:
    """Save a freshly initialised network of `size` (HF layout) under root/size; returns the directory.

    with_tokenizer: also train and save a small BPE and shrink the vocabulary to it, so every id the
    model can sample decodes to text (vLLM's detokenizer and TRL both need that).
    """
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    overrides = dict(SIZES[size])
    tok = None
    if with_tokenizer:
        tok = train_tokenizer(tokenizer_texts(), vocab_size=320)
        overrides["vocab_size"] = len(tok)
    net = model.build("tiny", seed=seed, **overrides)
    out = root / size
    net.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def param_summary(path: Path) -> str:
    net = model.from_pretrained(path)
    total, active = model.parameter_counts(net)
    return f"{total / 1e6:.1f}M params ({active / 1e6:.1f}M activated)"


def machine_line() -> str:
    """Cores, RAM and the 1-minute load average: the machine is shared, so the load belongs with the figures."""
    load1, load5, _ = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load avg 1/5 min {load1:.1f}/{load5:.1f}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (floats with 2 significant decimals, right-aligned)."""
    def cell(x) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
        return str(x)
    cells = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def process_role(proc: psutil.Process) -> str:
    """Name a process of a run's tree: Ray actors by class (their proctitle), Ray's own daemons as 'ray'."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    for actor in ("RolloutWorker", "TrainWorker"):
        if f"ray::{actor}" in cmd:
            return actor
    if "ray::" in cmd or "ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
        return "ray"
    return "other"


class TreeRSS:
    """Samples the resident memory of a process and all its descendants every `period` seconds.

    Keeps the peak of the sum and the peak per role (driver, RolloutWorker, TrainWorker, ray daemons):
    ru_maxrss alone would miss Ray actors, which are not children the kernel accounts to us.
    Also sums the CPU time of every process seen (up to its last sample): the run's total CPU seconds.
    """

    def __init__(self, pid: int, period: float = 0.25):
        self.root = psutil.Process(pid)
        self.period = period
        self.peak_total = 0
        self.peak_by_role: dict[str, int] = {}
        self.cpu_seconds: dict[int, float] = {}        # last user+system time seen per pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total, by_role = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                cpu = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.cpu_seconds[p.pid] = cpu.user + cpu.system
            role = "driver" if p.pid == self.root.pid else process_role(p)
            by_role[role] = by_role.get(role, 0) + rss
            total += rss
        self.peak_total = max(self.peak_total, total)
        for role, rss in by_role.items():
            self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total_cpu_seconds(self) -> float:
        return sum(self.cpu_seconds.values())


def brevity(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The GRPO benchmark's verifiable reward: 1 for an empty answer, 0 from 40 characters on.

    Learnable in a few steps from a random init (emit <|eos|> early), and free to compute, so the
    benchmark times the RL machinery rather than a reward model.
    """
    return [1.0 - min(len(c), 40) / 40 for c in completions]


def sevens(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Share of the completion's characters that are '7'. Stopping early earns nothing, so completions stay
    near the length cap and every step samples about the same number of tokens (a clean throughput ratio)."""
    return [c.count("7") / max(len(c), 1) for c in completions]


COUNT_PROMPT = "Count from {start}:"
_COUNT_START = re.compile(r"Count from (\d+):")


def count_target(start: int, n: int = 200) -> str:
    """The right answer to COUNT_PROMPT: the next n integers after `start`, space-separated."""
    return " ".join(str(start + 1 + i) for i in range(n))


def counting(prompts: list, completions: list[str], **columns) -> list[float]:
    """Length-neutral counting reward: the share of the completion's whitespace-separated items that are the
    right number at their position of the count after the prompt's start (the last item may be cut by the
    length cap: a prefix of the right number counts). 1.0 = a correct count, whatever its length; stopping
    early earns nothing and running long costs nothing, so completions stay at the cap and both frameworks
    sample the same tokens per step; partial credit keeps a group's rewards apart (no all-tied groups).
    Prompts may be text or chat messages (TRL passes the message list): the start is read from their text."""
    out = []
    for prompt, completion in zip(prompts, completions):
        m = _COUNT_START.search(str(prompt))
        items = completion.split()
        if m is None or not items:
            out.append(0.0)
            continue
        start = int(m.group(1))
        right = [item == str(start + 1 + i) for i, item in enumerate(items)]
        right[-1] = str(start + len(items)).startswith(items[-1])
        out.append(sum(right) / len(items))
    return out


REWARDS = {"brevity": brevity, "sevens": sevens, "counting": counting}
