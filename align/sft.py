"""Supervised fine-tuning (stage 1) with TRL's SFTTrainer, optionally with LoRA on MLA and MoE experts.

Loss is on assistant tokens only (the chat template marks them with {% generation %}), so the model
learns to answer, not to echo prompts. LoRA can target the routed experts' 3-D weight tensors
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) through PEFT's `target_parameters`.
The final checkpoint (Hugging Face layout plus tokenizer) is written atomically to `<output_dir>/model`.
"""

import re
from pathlib import Path

import torch
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from align.data.loading import DataSource, load_sources
from align.errors import UserError
from align.models import PRESETS, load_policy, load_tokenizer, save_atomically
from align.trl_args import TrainerSettings, last_trainer_checkpoint, shared_trainer_args


class LoraSettings(BaseModel):
    """LoRA adapters. `target_parameters` adapts raw 3-D expert tensors (PEFT needs dropout 0 there)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    target_parameters: list[str] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    @model_validator(mode="after")
    def _dropout_with_params(self) -> "LoraSettings":
        if self.target_parameters and self.dropout:
            raise ValueError("lora.dropout must be 0 when lora.target_parameters is set (PEFT cannot apply it there)")
        if not self.target_modules and not self.target_parameters:
            raise ValueError("lora needs target_modules or target_parameters")
        return self

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            target_parameters=list(self.target_parameters) or None,
            # No task_type: PEFT's CAUSAL_LM wrapper insists on GenerationMixin hooks that our network need not
            # have; the generic PeftModel wraps any module and saves/merges the same adapters.
        )


class SFTConfig(TrainerSettings):
    """Optimisation and checkpointing fields: align.trl_args.TrainerSettings."""

    model: str = "tiny"  # a preset name or a checkpoint directory
    train_data: list[DataSource]
    eval_data: list[DataSource] = []
    max_len: int = Field(512, gt=0)
    packing: bool = False
    lora: LoraSettings | None = None
    merge_lora_on_save: bool = True
    output_dir: str = "runs/sft"


def _trl_args(cfg: SFTConfig) -> TRLSFTConfig:
    return TRLSFTConfig(**shared_trainer_args(cfg), packing=cfg.packing, assistant_only_loss=True)


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Train (from the last resumable checkpoint when resume), save `<output_dir>/model` atomically,
    return {"metrics": ..., "output_path": ...}."""
    if cfg.lora is not None and not cfg.merge_lora_on_save and cfg.model in PRESETS:
        raise UserError(
            f"sft: LoRA on preset {cfg.model!r} without merge_lora_on_save leaves no base checkpoint on disk; "
            "set merge_lora_on_save: true or start from a checkpoint"
        )
    train, skipped = load_sources(cfg.train_data, required=["messages"])  # bad data fails before any work
    evals, eval_skipped = load_sources(cfg.eval_data, required=["messages"]) if cfg.eval_data else (None, 0)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.seed)
    last = last_trainer_checkpoint(cfg.output_dir) if resume else None
    # Resuming full fine-tuning: weights come from the checkpoint through our loader (Trainer's own
    # state-dict load would skip the routed experts, saved under per-expert checkpoint names).
    model = load_policy(last if last and cfg.lora is None else cfg.model, cfg.seed)

    trainer = SFTTrainer(
        model=model,
        args=_trl_args(cfg),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=cfg.lora.to_peft() if cfg.lora else None,
    )
    metrics: dict = {
        "train_rows": len(train),
        "skipped_rows": skipped + eval_skipped,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
    }
    if evals is not None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=last)
    metrics["train_loss"] = result.training_loss
    metrics["train_steps"] = result.global_step
    if evals is not None:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]

    out = Path(cfg.output_dir)
    trained = trainer.model
    if cfg.lora is not None:
        save_atomically(lambda d: (trained.save_pretrained(d), tokenizer.save_pretrained(d)), out / "adapter")
        if not cfg.merge_lora_on_save:
            return {"metrics": metrics, "output_path": str(out / "adapter")}
        trained = trained.merge_and_unload()
    save_atomically(lambda d: (trained.save_pretrained(d), tokenizer.save_pretrained(d)), out / "model")
    return {"metrics": metrics, "output_path": str(out / "model")}


_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, without thousands separators (simple on purpose: no rewards import)."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def _same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(b.replace(",", ""))
    except ValueError:
        return a.strip() == b.strip()


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of single-turn chat prompts (left-padded batches)."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True)
                for p in prompts[i: i + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def evaluate_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_new_tokens: int = 32
) -> float:
    """Share of rows {prompt, answer} whose greedy answer ends with the right `#### n`."""
    if not rows:
        raise ValueError("evaluate_accuracy needs at least one row")
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return sum(_same_number(extract_answer(a), str(r["answer"])) for a, r in zip(answers, rows)) / len(rows)
