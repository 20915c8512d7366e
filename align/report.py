"""The run report: markdown plus matplotlib PNGs, and the final SFT -> stage 1 -> stage 2 table."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

PLOTS = {  # file -> (title, metric prefixes or names)
    "rewards.png": ("reward per component", ["rewards/", "reward/"]),
    "kl.png": ("KL to reference (k3)", ["train/kl"]),
    "completion_length.png": ("completion length (tokens)", ["completion/len_mean"]),
    "heldout_accuracy.png": ("held-out accuracy", ["held_out/accuracy"]),
    "expert_load.png": ("MoE max/mean expert load", ["moe/max_over_mean_load"]),
}


def _metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(records_by_stage: dict[str, list[dict]], title: str, keys: list[str], out: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for stage, records in records_by_stage.items():
        names = sorted({k for r in records for k in r if any(k == p or (p.endswith("/") and k.startswith(p)
                        and k.endswith("mean")) for p in keys)})
        for name in names:
            pts = [(r["step"], r[name]) for r in records if name in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{stage}: {name}", marker=".")
                drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def final_table(summaries: dict[str, dict]) -> dict[str, dict[str, float]] | None:
    for summary in summaries.values():
        if "table" in summary:
            return summary["table"]
    return None


def write_report(root: Path, summaries: dict[str, dict]) -> Path:
    root = Path(root)
    by_stage = {name: _metrics(root / name) for name in summaries}
    by_stage = {k: v for k, v in by_stage.items() if v}
    lines = ["# deepalign run report", "", f"Output: `{root}`", "", "## Stages", "",
             "| stage | kind | seconds | output |", "|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s.get('stage', '?')} | {s.get('seconds', '?')} | {s.get('output_path', '')} |")
    table = final_table(summaries)
    if table:
        cols = sorted({c for row in table.values() for c in row})
        lines += ["", "## SFT vs GRPO stage 1 vs stage 2", "", "| checkpoint | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for label, row in table.items():
            lines.append(f"| {label} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |")
    lines += ["", "## Plots", ""]
    for fname, (title, keys) in PLOTS.items():
        if _plot(by_stage, title, keys, root / fname):
            lines.append(f"![{title}]({fname})")
    for name, s in summaries.items():
        extra = {k: v for k, v in s.items() if k not in ("stage", "seconds", "output_path", "table")}
        if extra:
            lines += ["", f"### {name}", "", "```json", json.dumps(extra, indent=2, default=str)[:4000], "```"]
    out = root / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def print_final_table(result: dict) -> None:
    console = Console()
    table = final_table(result.get("stages", {}))
    if table:
        cols = sorted({c for row in table.values() for c in row})
        t = Table(title="SFT vs GRPO stage 1 vs stage 2 (held-out)")
        t.add_column("checkpoint")
        for c in cols:
            t.add_column(c, justify="right")
        for label, row in table.items():
            t.add_row(label, *[f"{row.get(c, float('nan')):.3f}" for c in cols])
        console.print(t)
    if "report" in result:
        console.print(f"report: {result['report']}")
