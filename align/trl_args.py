"""The TRL trainer arguments the SFT and reward-model stages share (both configs use the same field names)."""
from __future__ import annotations

from pathlib import Path

import torch


def shared_trainer_args(cfg) -> dict:
    """Device and precision, optimisation, and no saving, evaluation or reporting inside TRL (we do those)."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(Path(cfg.output_dir) / "trainer"),
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
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
