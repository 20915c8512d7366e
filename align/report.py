"""The run report: markdown plus one training PNG, the SFT -> stage 1 -> stage 2 table with 95%
intervals and paired differences, each GRPO stage's final KL, and sample completions per stage."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from align.grpo.metrics import read_jsonl
from align.intervals import fmt, fmt_diff
from align.report_plots import plot_training

PLOT = "training.png"
SAMPLES_PER_STAGE = 3


def final_table(summaries: dict[str, dict]) -> tuple[dict, dict] | None:
    """(table, differences) of the compare stage, if the run has one."""
    for summary in summaries.values():
        if "table" in summary:
            return summary["table"], summary.get("differences", {})
    return None


def _columns(table: dict) -> list[str]:
    return list(dict.fromkeys(c for row in table.values() for c in row))


def _header(table: dict, column: str) -> str:
    cell = next(row[column] for row in table.values() if column in row)
    return f"{column} (n={cell['n']}, 95% {cell['interval']})"


def table_lines(table: dict, diffs: dict) -> list[str]:
    cols = _columns(table)
    lines = ["| checkpoint | " + " | ".join(_header(table, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(fmt(row[c]) if c in row else "" for c in cols) + " |")
    if diffs:
        lines += ["", "Paired differences (same prompts; 95% paired bootstrap):", "",
                  "| change | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, row in diffs.items():
            lines.append(f"| {name} | " + " | ".join(fmt_diff(row[c]) if c in row else "" for c in cols) + " |")
    return lines


def _cell_text(text: str, limit: int = 160) -> str:
    text = str(text).replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def sample_lines(root: Path, summaries: dict[str, dict]) -> list[str]:
    """The last logged step's completions of each GRPO stage (samples.jsonl), and the compare stage's
    greedy answers of every checkpoint to the first prompts of each held-out set."""
    lines: list[str] = []
    for name in summaries:
        samples = read_jsonl(root / name / "samples.jsonl")
        if not samples:
            continue
        last = max(s["step"] for s in samples)
        lines += ["", f"**{name}** (training samples, step {last})", "", "| prompt | completion | rewards |",
                  "|---|---|---|"]
        for s in [s for s in samples if s["step"] == last][:SAMPLES_PER_STAGE]:
            rewards = ", ".join(f"{k} {v:.2f}" for k, v in s.get("rewards", {}).items())
            lines.append(f"| {_cell_text(s['prompt'], 90)} | {_cell_text(s['completion'])} | {rewards} |")
    for name in summaries:
        path = root / name / "per_prompt.json"
        if not path.exists():
            continue
        raw = json.loads(path.read_text())
        for column, entry in raw.items():
            labels = list(entry["answers"])
            lines += ["", f"**{column}**: greedy held-out answers per checkpoint (score in brackets)", "",
                      "| prompt | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
            for i in range(min(2, len(entry["prompts"]))):
                cells = [f"{_cell_text(entry['answers'][lb][i], 100)} [{entry['scores'][lb][i]:.2f}]" for lb in labels]
                lines.append(f"| {_cell_text(entry['prompts'][i], 70)} | " + " | ".join(cells) + " |")
    return lines


def final_kl(records: list[dict]) -> tuple[float, float] | None:
    """(KL at the last step, mean over the last 5 steps) of a GRPO stage."""
    kls = [r["train/kl"] for r in records if "train/kl" in r]
    return (kls[-1], sum(kls[-5:]) / len(kls[-5:])) if kls else None


def write_report(root: Path, summaries: dict[str, dict]) -> Path:
    root = Path(root)
    by_stage = {name: read_jsonl(root / name / "metrics.jsonl") for name in summaries}
    by_stage = {k: v for k, v in by_stage.items() if v}
    lines = ["# deepalign run report", "", f"Output: `{root}`", "", "## Stages", "",
             "| stage | kind | seconds | output |", "|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s.get('stage', '?')} | {s.get('seconds', '?')} | {s.get('output_path', '')} |")
    found = final_table(summaries)
    if found:
        lines += ["", "## SFT vs GRPO stage 1 vs stage 2 (held-out, greedy)", "", *table_lines(*found)]
    if by_stage:
        lines += ["", "## GRPO stages", "", "| stage | steps | final KL (k3, last step) | KL, mean of last 5 steps | "
                  "held-out accuracy start -> end |", "|---|---|---|---|---|"]
        for name, records in by_stage.items():
            kl, s = final_kl(records), summaries.get(name, {})
            acc = f"{s.get('held_out_accuracy_start')} -> {s.get('held_out_accuracy_end')}"
            lines.append(f"| {name} | {len(records)} | {kl[0]:.4f} | {kl[1]:.4f} | {acc} |" if kl else
                         f"| {name} | {len(records)} | - | - | {acc} |")
    lines += ["", "## Plots", ""]
    if plot_training(by_stage, summaries, root / PLOT):
        lines.append(f"![training curves]({PLOT})")
    samples = sample_lines(root, summaries)
    if samples:
        lines += ["", "## Sample completions", *samples]
    for name, s in summaries.items():
        extra = {k: v for k, v in s.items() if k not in ("stage", "seconds", "output_path", "table", "differences")}
        if extra:
            lines += ["", f"### {name}", "", "```json", json.dumps(extra, indent=2, default=str)[:4000], "```"]
    out = root / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def print_final_table(result: dict) -> None:
    console = Console()
    found = final_table(result.get("stages", {}))
    if found:
        table, diffs = found
        cols = _columns(table)
        t = Table(title="SFT vs GRPO stage 1 vs stage 2 (held-out, greedy; 95% intervals)")
        t.add_column("checkpoint")
        for c in cols:
            t.add_column(_header(table, c), justify="right")
        for label, row in table.items():
            t.add_row(label, *[fmt(row[c]) if c in row else "" for c in cols])
        for name, row in diffs.items():
            t.add_row(f"Δ {name}", *[fmt_diff(row[c]) if c in row else "" for c in cols])
        console.print(t)
    if "report" in result:
        console.print(f"report: {result['report']}")
