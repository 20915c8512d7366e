"""Reward models (stage 2: helpful and safety) with TRL's RewardTrainer on chosen/rejected pairs.

The reward model is the SFT checkpoint with a scalar head (sequence classification, num_labels=1),
trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected). Pairs are fed to TRL in the
conversational implicit-prompt format: chosen = [user, assistant_good], rejected = [user, assistant_bad].
The result is a standard HF sequence-classification checkpoint (plus tokenizer) that
`AutoModelForSequenceClassification.from_pretrained` loads, written atomically to `<output_dir>/model`.
"""

from pathlib import Path

import torch
from datasets import Dataset
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import RewardConfig, RewardTrainer

from align.data.loading import DataSource, load_sources
from align.models import load_reward_model, load_tokenizer, save_atomically
from align.trl_args import TrainerSettings, last_trainer_checkpoint, shared_trainer_args

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class RMConfig(TrainerSettings):
    """Optimisation and checkpointing fields: align.trl_args.TrainerSettings."""

    model: str  # the SFT checkpoint directory
    train_data: list[DataSource]
    eval_data: list[DataSource] = []
    max_len: int = Field(512, gt=0)  # longer pairs are dropped by TRL, not truncated
    center_rewards_coefficient: float | None = None
    output_dir: str = "runs/rm"


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def to_implicit_pairs(rows: Dataset) -> Dataset:
    """{prompt, chosen, rejected} strings -> TRL's conversational implicit-prompt pairs."""
    return Dataset.from_list([
        {"chosen": _conversation(r["prompt"], r["chosen"]), "rejected": _conversation(r["prompt"], r["rejected"])}
        for r in rows
    ])


def run_rm(cfg: RMConfig, resume: bool = False) -> dict:
    """Train a reward model (from the last resumable checkpoint when resume), save `<output_dir>/model`
    atomically, return {"metrics", "output_path"}."""
    train_rows, skipped = load_sources(cfg.train_data, required=PAIR_COLUMNS)  # bad data fails before any work
    eval_rows, eval_skipped = (
        load_sources(cfg.eval_data, required=PAIR_COLUMNS) if cfg.eval_data else (None, 0)
    )
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    last = last_trainer_checkpoint(cfg.output_dir) if resume else None
    # Resuming: weights come from the checkpoint through our loader (Trainer's own state-dict load
    # would skip the routed experts, saved under per-expert checkpoint names).
    model = load_reward_model(last or cfg.model)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    args = RewardConfig(**shared_trainer_args(cfg), center_rewards_coefficient=cfg.center_rewards_coefficient)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=to_implicit_pairs(train_rows), processing_class=tokenizer
    )
    metrics: dict = {"train_rows": len(train_rows), "skipped_rows": skipped + eval_skipped}
    if eval_rows is not None:
        metrics["eval_accuracy_before"] = pairwise_accuracy(model, tokenizer, eval_rows)
    result = trainer.train(resume_from_checkpoint=last)
    metrics["train_loss"] = result.training_loss
    metrics["train_steps"] = result.global_step
    if eval_rows is not None:
        metrics["eval_accuracy_after"] = pairwise_accuracy(model, tokenizer, eval_rows)

    out = Path(cfg.output_dir) / "model"
    trained = trainer.model
    save_atomically(lambda d: (trained.save_pretrained(d), tokenizer.save_pretrained(d)), out)
    return {"metrics": metrics, "output_path": str(out)}


@torch.no_grad()
def score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Scalar rewards for (prompt, response) pairs, formatted with the chat template as in training."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    scores = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(_conversation(p, r), tokenize=False)
                for p, r in zip(prompts[i: i + batch_size], responses[i: i + batch_size])
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            scores.append(model(**enc).logits[:, 0].float().cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(scores) if scores else torch.empty(0)


def pairwise_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows) -> float:
    """Share of {prompt, chosen, rejected} rows where the chosen answer scores strictly higher."""
    rows = list(rows)
    if not rows:
        raise ValueError("pairwise_accuracy needs at least one row")
    prompts = [r["prompt"] for r in rows]
    chosen = score(model, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = score(model, tokenizer, prompts, [r["rejected"] for r in rows])
    return (chosen > rejected).float().mean().item()
