"""The report's training plot: one panel per quantity, the GRPO stages end to end on one step axis.

Panels: each reward component (raw mean per step; stage 1's `reasoning` and stage 2's `rule` are the
same rule reward and share a panel), the weighted total, KL to the reference, completion length,
held-out accuracy (per step when logged, and at each stage's start and end) and MoE expert load.
Each stage has its own colour: raw points plus a trailing moving average; a dashed line marks where
each later stage starts; one legend, above the panels, outside the data.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

ALIASES = {"rule": "rule", "reasoning": "rule"}   # stage 1's `reasoning` is stage 2's `rule` component
FIXED = [("reward/total_mean", "total reward (weighted, as trained)"), ("train/kl", "KL to reference (k3)"),
         ("completion/len_mean", "completion length (tokens)"), ("held_out/accuracy", "held-out accuracy (greedy)"),
         ("moe/max_over_mean_load", "MoE max/mean expert load")]
COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    x = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def panel_series(by_stage: dict[str, list[dict]], summaries: dict[str, dict]) -> tuple[dict, dict[str, int]]:
    """{panel title: {stage: [(global step, value)]}} and each stage's step offset (stages end to end)."""
    offsets, offset = {}, 0
    for stage, records in by_stage.items():
        offsets[stage] = offset
        offset += max((r.get("step", 0) for r in records), default=0)
    panels: dict[str, dict[str, list]] = {}

    def add(title: str, stage: str, step: float, value) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            panels.setdefault(title, {}).setdefault(stage, []).append((step, float(value)))

    components = sorted({ALIASES.get(k.split("/")[1], k.split("/")[1]) for rs in by_stage.values() for r in rs
                         for k in r if k.startswith("rewards/") and k.endswith("/mean") and k.count("/") == 2}
                        - {"total"})
    for name in components:
        panels[f"reward: {name} (raw mean per step)"] = {}
    for title in (t for _, t in FIXED):
        panels.setdefault(title, {})
    for stage, records in by_stage.items():
        off = offsets[stage]
        for r in records:
            step = off + r["step"]
            for k, v in r.items():
                if k.startswith("rewards/") and k.endswith("/mean") and k.count("/") == 2:
                    name = ALIASES.get(k.split("/")[1], k.split("/")[1])
                    if name != "total":
                        add(f"reward: {name} (raw mean per step)", stage, step, v)
            for key, title in FIXED:
                add(title, stage, step, r.get(key))
        s = summaries.get(stage, {})
        steps = s.get("steps") or max((r["step"] for r in records), default=0)
        add("held-out accuracy (greedy)", stage, off, s.get("held_out_accuracy_start"))
        add("held-out accuracy (greedy)", stage, off + steps, s.get("held_out_accuracy_end"))
    offsets["_end"] = offset
    return {t: v for t, v in panels.items() if v}, offsets


def plot_training(by_stage: dict[str, list[dict]], summaries: dict[str, dict], out: Path, window: int = 5) -> bool:
    """Write the panel figure to `out`; False when there is nothing to draw."""
    panels, offsets = panel_series(by_stage, summaries)
    if not panels:
        return False
    stages = list(by_stage)
    end = offsets.pop("_end")
    colour = {s: COLOURS[i % len(COLOURS)] for i, s in enumerate(stages)}
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.9 * rows + 0.9), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for stage, pts in series.items():
            pts = sorted(pts)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, ".", color=colour[stage], alpha=0.45 if len(pts) > 3 else 0.9,
                    markersize=5 if len(pts) > 3 else 9)
            if len(pts) >= 3:
                ax.plot(xs, smooth(list(ys), window), "-", color=colour[stage], linewidth=1.8)
            elif len(pts) == 2:
                ax.plot(xs, ys, "-", color=colour[stage], linewidth=1.2)
        for stage in stages[1:]:
            ax.axvline(offsets[stage], color="0.3", linestyle="--", linewidth=1)
        ax.set_xlim(-0.5, end + 0.5)                 # every panel on the same step axis
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step (stages end to end)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colour[s], marker=".", linestyle="-", label=s) for s in stages]
    handles += [Line2D([], [], color="0.5", marker=".", linestyle="none", label="raw (per step)"),
                Line2D([], [], color="0.5", linestyle="-", label=f"moving average ({window} steps)")]
    if len(stages) > 1:
        handles.append(Line2D([], [], color="0.3", linestyle="--", label=f"{stages[1]} starts"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.9 * rows + 0.9)))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
