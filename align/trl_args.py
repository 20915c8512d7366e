"""The TRL trainer arguments the SFT and reward-model stages share (both configs use the same field names)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def check_lr_scheduler(name: str) -> str:
    """A pydantic field validator for `lr_scheduler`: one of transformers' SchedulerType names."""
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise ValueError(f"unknown scheduler {name!r} (expected one of: {', '.join(names)})")
    return name


class TrainerSettings(BaseModel):
    """The optimisation and checkpointing fields the SFT and reward-model configs share (TRL trainer args)."""

    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Annotated[str, AfterValidator(check_lr_scheduler)] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(200, ge=0, description="resumable checkpoint every N optimizer steps (0 = none)")
    keep_last: int = Field(2, ge=1, description="resumable checkpoints kept")


def shared_trainer_args(cfg: TrainerSettings) -> dict:
    """Device and precision, optimisation, resumable checkpoints; no evaluation or reporting inside TRL (we do those)."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(trainer_dir(cfg.output_dir)),
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),  # TRL defaults to bf16, which CPUs run slowly or not at all
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        max_length=cfg.max_len,
        gradient_checkpointing=False,  # tiny models: recompute costs more than it saves
        logging_steps=cfg.logging_steps,
        # Resumable checkpoints (model, optimizer, scheduler, RNG) every save_steps; `--resume` continues the last.
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.keep_last,
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainer_dir(output_dir: str | Path) -> Path:
    """Where the TRL trainer writes its resumable checkpoints (checkpoint-<step>/)."""
    return Path(output_dir) / "trainer"


def last_trainer_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-<step> (its trainer_state.json, written last, parses), else None."""
    root = trainer_dir(output_dir)
    steps = []
    for d in root.glob("checkpoint-*") if root.is_dir() else ():
        try:
            json.loads((d / "trainer_state.json").read_text())
            steps.append((int(d.name.rsplit("-", 1)[1]), d))
        except (OSError, ValueError):
            continue
    return str(max(steps)[1]) if steps else None
