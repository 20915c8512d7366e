"""Who owns an output directory: a stage refuses to write into another run's checkpoints.

Every training stage (sft, rm, grpo) writes `RUN.json` = {stage, run_id} into its output dir when it
starts. `run_id` hashes the resolved recipe, minus the fields a user may change when continuing a
run (how many steps, how often to save). Starting into a dir that already holds checkpoints:

    neither flag   refuse: one line saying to pass --resume (continue it) or --force (clear it)
    --resume       continue, but only a run with the same run_id (never another recipe's step)
    --force        delete the directory's contents and start over

So new checkpoints are never pruned in favour of an older run's, and a resume never picks up
someone else's step.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.errors import UserError
from align.eval.io import write_json

RUN_FILE = "RUN.json"
# Fields that do not change which run a checkpoint belongs to: extending or re-saving a run is allowed, and
# so is moving it to another cluster shape (sharded checkpoints reshard: a 2-rank fsdp2 step resumes at 1 rank).
CONTINUATION_FIELDS = ("steps", "max_steps", "save_every", "save_steps", "keep_last", "logging_steps",
                       "wandb_project", "engine.cluster", "engine.train.world_size", "engine.train.replicas",
                       "engine.train.cpu_offload")


def checkpoints_in(output_dir: Path) -> list[Path]:
    """Resumable checkpoints of any stage: grpo's checkpoints/step-N, TRL's trainer/checkpoint-N."""
    found = list((output_dir / "checkpoints").glob("step-*")) + list((output_dir / "trainer").glob("checkpoint-*"))
    return sorted(p for p in found if p.is_dir())


def claim_output_dir(output_dir: Path, stage: str, run_id: str, resume: bool, force: bool) -> None:
    """Make output_dir this run's (see the module docstring); raises UserError with one line otherwise."""
    output_dir = Path(output_dir)
    if force and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoints_in(output_dir)
    owner_file = output_dir / RUN_FILE
    owner = None
    if owner_file.is_file():
        try:
            owner = json.loads(owner_file.read_text())
        except ValueError:
            owner = None
    if ckpts:
        if not resume:
            raise UserError(f"{output_dir}: holds checkpoints of an earlier run (last: {ckpts[-1].name}); pass "
                            "--resume to continue it or --force to clear it")
        if owner is None or owner.get("run_id") != run_id or owner.get("stage") != stage:
            theirs = f"{owner.get('stage')} run {owner.get('run_id')}" if owner else "a run with no RUN.json"
            raise UserError(f"{output_dir}: its checkpoints belong to {theirs}, not this {stage} recipe "
                            f"(run {run_id}); use --force to clear it or another --output-dir")
    write_json(owner_file, {"stage": stage, "run_id": run_id})
