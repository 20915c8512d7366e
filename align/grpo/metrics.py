"""Run logs: metrics.jsonl (+ TensorBoard, W&B) and samples.jsonl, one fsynced JSON line per record.

Both files are written by JsonlLog, which on resume drops the records of steps after the checkpoint
(the resumed run writes them again); `read_jsonl` is the reader the report uses.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of a run dir: the same in every process (Python's hash() of a str is salted per process),
    so a resumed run logs into the run it continues."""
    return "deepalign-" + hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record (a line cut by a crash is skipped)."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class JsonlLog:
    """Append-only JSONL of per-step records; keeps only records with step <= start_step of an earlier run."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


class MetricsLog:
    """metrics.jsonl (one line per step, fsynced) and TensorBoard; a resumed run truncates later steps."""

    def __init__(self, output_dir: Path, start_step: int, wandb_project: str | None = None, config: dict | None = None):
        self.jsonl = JsonlLog(output_dir / "metrics.jsonl", start_step)
        self.path = self.jsonl.path
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                from align.errors import UserError
                raise UserError("grpo.wandb_project: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=config, resume="allow",
                                    id=wandb_run_id(output_dir))

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class SamplesLog:
    """samples.jsonl beside metrics.jsonl: a few completions per step with every reward component."""

    def __init__(self, output_dir: Path, start_step: int, per_step: int):
        self.per_step = per_step
        self.jsonl = JsonlLog(output_dir / "samples.jsonl", start_step)

    def write(self, step: int, prompts: list[str], completions: list[str], totals: list[float],
              components: dict[str, list[float]], group_size: int) -> None:
        """One completion from each of the first `per_step` groups (the first of its group)."""
        for i in list(range(0, len(completions), group_size))[: self.per_step]:
            self.jsonl.write({"step": step, "prompt": prompts[i], "completion": completions[i],
                              "reward": float(totals[i]), "rewards": {k: float(v[i]) for k, v in components.items()}})
